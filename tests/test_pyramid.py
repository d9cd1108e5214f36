"""Expert Pyramid adapters: the seed expansion is a transposed convolution, the adapted
layer starts as its base, and the merged layer equals the unmerged one per task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechinterp.models.pyramid import PyramidDense, expand_seed, merged_kernel


def test_expand_seed_is_a_stride_one_transposed_convolution():
    rng = np.random.default_rng(0)
    seed, kernel = rng.normal(size=(3, 3)), rng.normal(size=(2, 2))
    want = np.zeros((4, 4))
    for i, j in np.ndindex(3, 3):  # each seed entry scatters a scaled copy of the kernel
        want[i:i + 2, j:j + 2] += seed[i, j] * kernel
    np.testing.assert_allclose(np.asarray(expand_seed(seed, kernel)), want, atol=1e-5)


@pytest.fixture(scope="module")
def layer_and_params():
    layer = PyramidDense(7, 5, n_tasks=3, seed_rank=2, kernel_sizes=(1, 3))
    x = jax.random.normal(jax.random.key(0), (6, 7))
    task = jnp.array([0, 1, 2, 0, 1, 2])
    params = layer.init(jax.random.key(1), x, task)["params"]
    return layer, params, x, task


def test_starts_as_the_base_layer(layer_and_params):
    layer, params, x, task = layer_and_params
    base = x @ params["base"]["kernel"] + params["base"]["bias"]
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x, task)),
                               np.asarray(base), atol=1e-6)


def test_merged_equals_unmerged_for_every_task(layer_and_params):
    layer, params, x, task = layer_and_params
    rng = np.random.default_rng(1)  # trained-looking adapters: nonzero Q and router
    params = {**params, **{k: jnp.asarray(rng.normal(size=params[k].shape), jnp.float32)
                           for k in ("Q1", "Q3", "router")}}
    out = np.asarray(layer.apply({"params": params}, x, task))
    assert np.abs(out - np.asarray(x @ params["base"]["kernel"])).max() > 1e-2
    for t in range(3):
        merged = x @ merged_kernel(layer, params, t) + params["base"]["bias"]
        rows = np.asarray(task) == t
        np.testing.assert_allclose(np.asarray(merged)[rows], out[rows], rtol=1e-5, atol=1e-5)
    # expert ranks grow with the kernel: r + k - 1
    deltas = layer.apply({"params": params}, method=PyramidDense.expert_deltas)
    assert [int(np.linalg.matrix_rank(np.asarray(d, np.float64), tol=1e-5))
            for d in deltas] == [2, 4]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="seed_rank"):
        PyramidDense(3, 2, n_tasks=1, seed_rank=0).init(
            jax.random.key(0), jnp.ones((1, 3)), jnp.zeros(1, int))
    with pytest.raises(ValueError, match="d_in=4"):
        PyramidDense(3, 2, n_tasks=1).init(jax.random.key(0), jnp.ones((1, 4)),
                                           jnp.zeros(1, int))


def test_smoke_run_merges_exactly_and_counts_parameters(smoke_run):
    import json
    results = json.loads((smoke_run("expert_pyramid") / "results.json").read_text())
    row = results["per_seed"][0]
    for method in ("base", "full", "lora", "pyramid"):
        assert 0.0 <= row[method]["tasks_acc"] <= 1.0
    assert row["pyramid"]["merged_tasks_acc"] == row["pyramid"]["tasks_acc"]
    # matched budgets: the single LoRA has the pyramid's total rank, fewer than full's
    assert row["lora"]["trainable"] < row["full"]["trainable"]
    gates = np.asarray(row["pyramid"]["router_gates"])  # layer x task x expert
    assert gates.shape == (2, 4, 3) and np.allclose(gates.sum(-1), 1.0, atol=2e-3)
