"""Gating kernels: the fused SwiGLU gate and the threshold-gain gate.

- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
  ``y = silu(g) * u``.
- Threshold-gain gate: ``y = g * h * sigmoid((h - tau) / T)``; ``hard=True`` uses the
  step ``1[h > tau]``.

Each has a ``*_reference`` (plain ``jnp``), a ``*_pallas`` kernel with a Pallas backward
(``custom_vjp``) and a dispatcher (:func:`swiglu`, :func:`threshold_gain`): Pallas on
TPU, the reference on CPU and GPU (on an H200 XLA's fused reference was about 2x faster),
unless ``impl`` says otherwise.

Design notes (gradients, measurements, what was run where): docs/moe.md ("Gating kernels").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LANES = 128
MAX_BLOCK_ROWS = 256
IMPLS = ("pallas", "reference")


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _pick(impl: str | None) -> str:
    if impl is None:
        return "pallas" if jax.default_backend() == "tpu" else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; supported: {IMPLS} or None")
    return impl


def _elementwise(body, n_out: int, *arrays):
    """Run ``body(*float32 tiles) -> n_out float32 tiles`` over same-shape ``arrays`` with
    one Pallas kernel; outputs have the arrays' shape and the first array's dtype."""
    shape, dtype = arrays[0].shape, arrays[0].dtype
    for a in arrays[1:]:
        if a.shape != shape:
            raise ValueError(f"gating kernel inputs must have one shape, got {shape} and "
                             f"{a.shape}")
    size = math.prod(shape)
    rows = max(1, -(-size // LANES))
    block_rows = min(MAX_BLOCK_ROWS, -(-rows // 8) * 8)
    rows = -(-rows // block_rows) * block_rows
    padded = [jnp.pad(a.reshape(-1), (0, rows * LANES - size)).reshape(rows, LANES)
              for a in arrays]

    def kernel(*refs):
        ins, outs = refs[:len(arrays)], refs[len(arrays):]
        results = body(*(r[...].astype(jnp.float32) for r in ins))
        for ref, value in zip(outs, results):
            ref[...] = value.astype(ref.dtype)

    spec = pl.BlockSpec((block_rows, LANES), lambda i: (i, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((rows, LANES), dtype)] * n_out,
        grid=(rows // block_rows,),
        in_specs=[spec] * len(arrays),
        out_specs=[spec] * n_out,
        interpret=_interpret(),
    )(*padded)
    return [o.reshape(-1)[:size].reshape(shape) for o in out]


# --------------------------------------------------------------------------- SwiGLU


def swiglu_reference(g, u):
    """``silu(g) * u`` in plain jnp (Shazeer 2020)."""
    return jax.nn.silu(g) * u


@jax.custom_vjp
def swiglu_pallas(g, u):
    """``silu(g) * u`` as one Pallas kernel (GPU/TPU path never run on a GPU/TPU here)."""
    return _elementwise(lambda g, u: (g * jax.nn.sigmoid(g) * u,), 1, g, u)[0]


def _swiglu_fwd(g, u):
    return swiglu_pallas(g, u), (g, u)


def _swiglu_bwd(res, dy):
    g, u = res

    def body(g, u, dy):
        s = jax.nn.sigmoid(g)
        return dy * u * s * (1 + g * (1 - s)), dy * g * s

    dg, du = _elementwise(body, 2, g, u, dy.astype(g.dtype))
    return dg, du.astype(u.dtype)


swiglu_pallas.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(g, u, impl: str | None = None):
    """Dispatcher: :func:`swiglu_pallas` on TPU (or ``impl="pallas"``, interpreted on CPU),
    :func:`swiglu_reference` on CPU and GPU (or ``impl="reference"``)."""
    if _pick(impl) == "pallas":
        return swiglu_pallas(g, u)
    return swiglu_reference(g, u)


# --------------------------------------------------------------------------- threshold gain


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def threshold_gain_reference(g, h, tau: float = 0.0, temperature: float = 1.0,
                             hard: bool = False):
    """``g * h * sigmoid((h - tau) / T)``, or ``g * h * 1[h > tau]`` when ``hard``."""
    _check_temperature(temperature)
    if hard:
        return g * h * (h > tau).astype(h.dtype)
    return g * h * jax.nn.sigmoid((h - tau) / temperature)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _threshold_gain(g, h, tau, temperature, hard):
    def body(g, h):
        gate = (h > tau).astype(h.dtype) if hard else jax.nn.sigmoid((h - tau) / temperature)
        return (g * h * gate,)
    return _elementwise(body, 1, g, h)[0]


def _tg_fwd(g, h, tau, temperature, hard):
    return _threshold_gain(g, h, tau, temperature, hard), (g, h)


def _tg_bwd(tau, temperature, hard, res, dy):
    g, h = res

    def body(g, h, dy):
        if hard:
            step = (h > tau).astype(h.dtype)
            return dy * h * step, dy * g * step
        s = jax.nn.sigmoid((h - tau) / temperature)
        return dy * h * s, dy * g * (s + h * s * (1 - s) / temperature)

    dg, dh = _elementwise(body, 2, g, h, dy.astype(g.dtype))
    return dg, dh.astype(h.dtype)


_threshold_gain.defvjp(_tg_fwd, _tg_bwd)


def threshold_gain_pallas(g, h, tau: float = 0.0, temperature: float = 1.0,
                          hard: bool = False):
    """The threshold-gain gate as one Pallas kernel with a Pallas backward (GPU/TPU path
    never run on a GPU/TPU here). ``tau``, ``temperature`` and ``hard`` are static."""
    _check_temperature(temperature)
    return _threshold_gain(g, h, float(tau), float(temperature), bool(hard))


def threshold_gain(g, h, tau: float = 0.0, temperature: float = 1.0, hard: bool = False,
                   impl: str | None = None):
    """Dispatcher: :func:`threshold_gain_pallas` on TPU (or ``impl="pallas"``, interpreted
    on CPU), :func:`threshold_gain_reference` on CPU and GPU (or ``impl="reference"``)."""
    if _pick(impl) == "pallas":
        return threshold_gain_pallas(g, h, tau, temperature, hard)
    return threshold_gain_reference(g, h, tau, temperature, hard)
