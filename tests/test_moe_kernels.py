"""MoE kernels against their references: the fused router (Pallas, interpret mode on CPU) and
the grouped matmul (ragged_dot; megablox and the block-padded Pallas kernel in interpret
mode).

Forward and gradient, several shapes, ties, uneven loads, empty experts, token counts that
span several kernel blocks and do not fill the last one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models.kernels import (
    fused_router,
    fused_router_pallas,
    fused_router_reference,
    gmm,
    gmm_ragged,
    gmm_reference,
)
from mechinterp.models.kernels.gmm import fits_triton

# (logits shape, k, router, norm_topk_prob, block_tokens, how the logits are made)
SLOW = pytest.mark.slow
ROUTER_CASES = [
    ((37, 6), 2, "softmax", True, 8, "normal"),         # 5 blocks, the last one partial
    pytest.param((3, 50, 10), 3, "sigmoid", False, 32, "normal", marks=SLOW),  # leading axes
    pytest.param((64, 64), 8, "softmax", False, 128, "normal", marks=SLOW),    # 64 experts
    ((40, 5), 2, "softmax", True, 16, "ties"),          # integer logits: many exact ties
    ((48, 8), 2, "sigmoid", True, 16, "uneven"),        # skewed load, experts 5..7 empty
    pytest.param((20, 4), 4, "softmax", False, 8, "normal", marks=SLOW),       # k == E
]


def make_logits(shape, how, seed=0):
    logits = jax.random.normal(jax.random.key(seed), shape)
    if how == "ties":
        return jnp.round(logits)
    if how == "uneven":
        bias = jnp.array([3.0, 2.0, 1.0, 0.5, 0.0, -30.0, -30.0, -30.0])
        return logits + bias
    return logits


def plan_loss(plan):
    """A scalar that weighs every top-k slot and every probability differently."""
    k = plan.weights.shape[-1]
    e = plan.probs.shape[-1]
    return (jnp.sum(plan.weights * jnp.linspace(1.0, -0.5, k))
            + jnp.sum(jnp.sin(jnp.arange(e)) * plan.probs ** 2))


def numpy_plan(indices, n_experts):
    """Group sizes, offsets and the stable expert order with a float64-free numpy loop."""
    flat = np.asarray(indices).reshape(-1)
    sizes = np.array([(flat == e).sum() for e in range(n_experts)])
    order = [a for e in range(n_experts) for a in range(flat.size) if flat[a] == e]
    return sizes, np.cumsum(sizes) - sizes, np.array(order)


@pytest.mark.parametrize("shape,k,router,norm,block,how", ROUTER_CASES)
def test_fused_router_matches_reference(shape, k, router, norm, block, how):
    logits = make_logits(shape, how)
    def plan_and_grad(route):
        def loss(x):
            plan = route(x)
            return plan_loss(plan), plan
        (_, plan), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)
        return plan, grad

    got, grad_fast = plan_and_grad(
        lambda x: fused_router_pallas(x, k, router, norm, block_tokens=block))
    want, grad_ref = plan_and_grad(lambda x: fused_router_reference(x, k, router, norm))
    np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6, atol=1e-7)
    for name in ("indices", "group_sizes", "group_offsets", "order"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    sizes, offsets, order = numpy_plan(got.indices, shape[-1])
    np.testing.assert_array_equal(got.group_sizes, sizes)
    np.testing.assert_array_equal(got.group_offsets, offsets)
    np.testing.assert_array_equal(got.order, order)
    if how == "uneven":
        assert (np.asarray(got.group_sizes)[5:] == 0).all()
    np.testing.assert_allclose(grad_fast, grad_ref, rtol=1e-5, atol=1e-6)


def test_fused_router_dispatch_dtype_and_bad_input():
    logits = make_logits((12, 6), "normal")
    # CPU picks the reference unless asked
    np.testing.assert_array_equal(fused_router(logits, 2).order,
                                  fused_router_reference(logits, 2).order)

    def loss(x):
        plan = fused_router(x, 2, impl="pallas")
        return plan_loss(plan), plan

    half = logits.astype(jnp.bfloat16)
    (_, got), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(half)
    want = fused_router_reference(half, 2)
    assert got.probs.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.probs, want.probs, rtol=1e-6)
    np.testing.assert_array_equal(got.order, want.order)
    with pytest.raises(ValueError, match="top-k=7"):
        fused_router_pallas(logits, 7)
    with pytest.raises(ValueError, match="router='relu'"):
        fused_router_reference(logits, 2, "relu")
    with pytest.raises(ValueError, match="impl='triton'"):
        fused_router(logits, 2, impl="triton")
    with pytest.raises(ValueError, match="block_tokens"):
        fused_router_pallas(logits, 2, block_tokens=12)


# --------------------------------------------------------------------------- grouped matmul

# (M, K, N, group sizes): an empty middle group and uneven loads; one expert takes every row
# (empty first and last groups, 128-wide tiles); fewer rows in groups than M (the rest are 0)
GMM_CASES = [(40, 16, 24, [10, 0, 25, 5]),
             pytest.param(200, 128, 128, [0, 200, 0], marks=SLOW),
             pytest.param(30, 8, 12, [3, 3, 0, 3, 6], marks=SLOW)]


@pytest.mark.parametrize("impl", ["ragged", "megablox", "pallas"])
@pytest.mark.parametrize("m,k,n,sizes", GMM_CASES)
def test_grouped_matmul_matches_reference(impl, m, k, n, sizes):
    backend = jax.default_backend()
    if impl == "megablox" and backend not in ("cpu", "tpu"):
        pytest.skip("megablox is a TPU kernel (interpreted on CPU)")
    if impl == "pallas" and backend == "gpu" and not fits_triton(k, n):
        pytest.skip(f"K={k}, N={n} are not Triton blocks (gmm dispatches to ragged_dot)")
    sizes = jnp.array(sizes, jnp.int32)
    k1, k2, k3 = jax.random.split(jax.random.key(m), 3)
    lhs = jax.random.normal(k1, (m, k))
    rhs = jax.random.normal(k2, (len(sizes), k, n))
    dout = jax.random.normal(k3, (m, n))

    def out_and_grads(fn):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return out, *vjp(dout)

    got = jax.jit(lambda: out_and_grads(lambda *a: gmm(*a, impl=impl)))()
    want = jax.jit(lambda: out_and_grads(gmm_reference))()
    # float64 numpy per-row check of the reference itself
    ends = np.cumsum(sizes)
    rows = [np.asarray(lhs[r], np.float64) @ np.asarray(rhs[np.searchsorted(ends, r, "right")])
            if r < ends[-1] else np.zeros(n) for r in range(m)]
    np.testing.assert_allclose(want[0], np.stack(rows), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    assert (np.asarray(got[0])[int(ends[-1]):] == 0).all()


def test_grouped_matmul_dispatch_and_bad_input():
    lhs, rhs = jnp.ones((6, 4)), jnp.ones((2, 4, 3))
    sizes = jnp.array([2, 4], jnp.int32)
    np.testing.assert_array_equal(gmm(lhs, rhs, sizes), gmm_ragged(lhs, rhs, sizes))
    with pytest.raises(ValueError, match="impl='cuda'"):
        gmm(lhs, rhs, sizes, impl="cuda")
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(lhs, rhs, jnp.array([6], jnp.int32))
    with pytest.raises(ValueError, match="K=5"):
        gmm(jnp.ones((6, 5)), rhs, sizes)


def test_benchmark_smoke_run(capsys):
    """benchmarks/moe_kernels.py --quick: every kernel matches its reference, and CPU
    timings of Pallas kernels are labelled as interpret mode."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "moe_kernels.py"
    spec = importlib.util.spec_from_file_location("moe_kernels_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick"])
    printed = capsys.readouterr().out
    assert "all results match their references" in printed
    interpreted = 4 if jax.default_backend() == "cpu" else 0  # router, 2 gates, Pallas gmm
    assert printed.count("(interpret)") == interpreted
    assert "same-FLOPs dense" in printed and "einsum over experts" in printed
