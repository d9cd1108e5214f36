"""Gating kernels: Pallas (interpret mode on CPU) against the jnp reference, forward and
gradient, on several shapes (including ones that do not fill a tile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechinterp.models.kernels import (swiglu, swiglu_pallas, swiglu_reference,
                                       threshold_gain, threshold_gain_pallas,
                                       threshold_gain_reference)

SHAPES = [(7,), (3, 5, 11), (4, 128), (2, 300, 130)]


def inputs(shape, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, shape), jax.random.normal(k2, shape),
            jax.random.normal(k3, shape))


def check(fast, ref, shape):
    g, u, dy = inputs(shape)
    np.testing.assert_allclose(jax.jit(fast)(g, u), ref(g, u), rtol=1e-6, atol=1e-6)
    grad_fast = jax.jit(jax.vjp(fast, g, u)[1])(dy)
    grad_ref = jax.vjp(ref, g, u)[1](dy)
    for a, b in zip(grad_fast, grad_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_reference(shape):
    check(swiglu_pallas, swiglu_reference, shape)


@pytest.mark.parametrize("shape", [(3, 5, 11), (2, 300, 130)])
@pytest.mark.parametrize("tau,temperature,hard", [(0.0, 1.0, False), (0.3, 0.25, False),
                                                  (0.3, 0.25, True)])
def test_threshold_gain_matches_reference(shape, tau, temperature, hard):
    check(lambda g, h: threshold_gain_pallas(g, h, tau, temperature, hard),
          lambda g, h: threshold_gain_reference(g, h, tau, temperature, hard), shape)


def test_dispatch_and_dtypes():
    g, u, _ = inputs((4, 9))
    # CPU picks the reference unless asked
    np.testing.assert_array_equal(swiglu(g, u), swiglu_reference(g, u))
    np.testing.assert_allclose(swiglu(g, u, impl="pallas"), swiglu_reference(g, u), rtol=1e-6)
    out = swiglu_pallas(g.astype(jnp.bfloat16), u.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), swiglu_reference(g, u), atol=3e-2)
    hard = threshold_gain(g, u, 0.2, 0.1, hard=True, impl="pallas")
    np.testing.assert_array_equal(hard, np.where(u > 0.2, g * u, 0.0))
    with pytest.raises(ValueError, match="impl='cuda'"):
        swiglu(g, u, impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        threshold_gain(g, u, 0.0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        swiglu_pallas(g, u[:, :3])
