"""The CNN family: BatchNorm semantics against plain numpy (float64), scanned == unrolled,
and the sweep engine's (layer, channel) ablation and (layer, spatial position) patching grids
against a plain loop of single interventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp
from mechinterp import Intervention
from mechinterp.family import HasLayers, has
from mechinterp.models.cnn import CNN
from mechinterp.models.layers import BatchNorm
from mechinterp.sweep import sweep
from random_params import random_variables


def _bn_reference(x, scale, bias, mean, var, eps):
    return scale * (x - mean) / np.sqrt(var + eps) + bias


def test_batchnorm_train_and_eval_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (6, 4, 4, 5)).astype(np.float32)
    bn = BatchNorm(momentum=0.8, eps=1e-3)
    variables = bn.init(jax.random.key(0), x)
    params = {"scale": jnp.asarray(rng.normal(size=5), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    x64 = x.astype(np.float64)
    mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))  # biased variance, as in training
    scale, bias = (np.asarray(params[k], np.float64) for k in ("scale", "bias"))

    y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y, _bn_reference(x64, scale, bias, mean, var, 1e-3), atol=2e-5)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.8 + 0.2 * var, rtol=1e-5)

    # eval: the running averages, not the batch's statistics
    z = bn.apply({"params": params, **updated}, x, train=False)
    expected = _bn_reference(x64, scale, bias, 0.2 * mean, 0.8 + 0.2 * var, 1e-3)
    np.testing.assert_allclose(z, expected, atol=2e-5)
    # train=True without a mutable stats collection normalizes but leaves the stats alone
    np.testing.assert_allclose(bn.apply({"params": params, **updated}, x, train=True), y)


@pytest.fixture(scope="module")
def trained():
    """A CNN with BatchNorm statistics from a few train-mode passes, in analysis form."""
    model = CNN(n_classes=4, width=6, n_layers=2)
    images = jax.random.normal(jax.random.key(0), (3, 6, 6, 1))
    variables = random_variables(model, images)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
    for k in range(3):
        batch = jax.random.normal(jax.random.key(10 + k), (8, 6, 6, 1)) * 2 + 0.5
        variables = {**variables, **train(variables, batch)}
    analysis_model, params = model.for_analysis(variables)
    return model, variables, analysis_model, params, images


def test_analysis_form_is_inference_mode(trained):
    model, variables, analysis_model, params, images = trained
    assert has(analysis_model, HasLayers)
    assert analysis_model.layer_structure().n_layers == 2
    eval_logits = model.apply(variables, images)  # train=False: running statistics
    np.testing.assert_allclose(analysis_model.apply({"params": params}, images), eval_logits,
                               atol=1e-6)
    train_logits = model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(train_logits - eval_logits)).max() > 1e-3
    unrolled = CNN(n_classes=4, width=6, n_layers=2, scan_layers=False, stats="params")
    flat = {k: v for k, v in params.items() if k != "layers"}
    for i in range(2):
        flat[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    out, cache = mechinterp.capture(unrolled, flat, images, sites=["conv.hidden"])
    ref_out, ref_cache = mechinterp.capture(analysis_model, params, images,
                                            sites=["conv.hidden"])
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(cache["conv.hidden"], ref_cache["conv.hidden"])


def _metric(labels):
    def metric(logits):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return metric


def test_channel_ablation_grid_matches_loop(trained):
    _, _, model, params, images = trained
    metric = _metric(jnp.array([0, 1, 2]))
    _, cache = mechinterp.capture(model, params, images, sites=["conv.hidden"])
    source = jnp.zeros_like(cache["conv.hidden"])
    grid = sweep(model, params, (images,), "conv.hidden", ("layer", "channel"), source, metric,
                 make_intervention=lambda src, mask: Intervention.zero(mask), progress=False)
    assert grid.shape == (2, 6)
    for layer in range(2):
        for channel in range(6):
            mask = np.zeros((2, 1, 1, 1, 6), np.float32)
            mask[layer, ..., channel] = 1
            logits = mechinterp.intervene(model, params, images, interventions={
                "conv.hidden": Intervention.zero(jnp.asarray(mask))})
            np.testing.assert_allclose(grid.values[layer, channel], metric(logits), atol=1e-5)
    clean = metric(model.apply({"params": params}, images))
    assert np.abs(grid.values - clean).max() > 1e-4  # ablations change the metric


def test_spatial_patching_grid_matches_loop(trained):
    _, _, model, params, images = trained
    corrupted = images[::-1]
    metric = _metric(jnp.array([3, 0, 1]))
    _, clean_cache = mechinterp.capture(model, params, images, sites=["resid_pre"])
    grid = sweep(model, params, (corrupted,), "resid_pre", ("layer", "height", "width"),
                 clean_cache["resid_pre"], metric, progress=False)
    assert grid.shape == (2, 6, 6)
    rng = np.random.default_rng(1)
    cells = [(0, 0, 0), (1, 5, 2), (0, 3, 4), *rng.integers(0, 6, (3, 3)) % [2, 6, 6]]
    for layer, row, col in cells:
        mask = np.zeros((2, 1, 6, 6, 1), np.float32)
        mask[layer, :, row, col] = 1
        logits = mechinterp.intervene(model, params, corrupted, interventions={
            "resid_pre": Intervention.patch(clean_cache["resid_pre"], jnp.asarray(mask))})
        np.testing.assert_allclose(grid.values[layer, row, col], metric(logits), atol=1e-5)
    assert grid.values.std() > 1e-4


def test_bad_image_shape_names_the_fix():
    with pytest.raises(ValueError, match="add a trailing channel axis"):
        CNN().init(jax.random.key(0), jnp.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="whole variables dict"):
        CNN().for_analysis({"batch_stats": {}})
