"""Patching grids and metrics on a tiny decoder, against one intervene call per cell."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp import metrics, patching
from mechinterp.models import Decoder, DecoderConfig
from test_decoder import random_params

N_LAYERS, BATCH, SEQ, VOCAB = 2, 3, 6, 64


@pytest.fixture(scope="module")
def setup():
    config = DecoderConfig(vocab_size=VOCAB, d_model=32, n_layers=N_LAYERS, n_heads=4,
                           n_kv_heads=2, d_mlp=48)
    model = Decoder(config)
    clean = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    corrupted = clean.at[:, 2].set((clean[:, 2] + 7) % VOCAB)
    params = random_params(model, clean, seed=1)
    _, cache = mi.capture(model, params, clean)
    metric = metrics.logit_diff(jnp.array([1, 2, 3]), jnp.array([4, 5, 6]))
    return model, params, clean, corrupted, cache, metric


def _loop_reference(model, params, corrupted, cache, metric, site_name, grid_axes):
    """One intervene call per cell, as TransformerLens does it."""
    info = mi.list_sites(model, corrupted)[site_name]
    dims = [info.axes.index(axis) for axis in grid_axes]
    grid_shape = tuple(info.shape[d] for d in dims)
    out = np.zeros(grid_shape)
    for index in np.ndindex(*grid_shape):
        mask = np.zeros([info.shape[d] if d in dims else 1 for d in range(len(info.shape))],
                        np.float32)
        full_index = [0] * len(info.shape)
        for d, i in zip(dims, index, strict=True):
            full_index[d] = i
        mask[tuple(full_index)] = 1.0
        patch = mi.Intervention.patch(cache[site_name], mask)
        logits = mi.intervene(model, params, corrupted, interventions={site_name: patch})
        out[index] = metric(logits)
    return out


@pytest.mark.parametrize(
    "name, site_name, grid_axes",
    [
        ("get_act_patch_resid_pre", "resid_pre", ("layer", "pos")),
        ("get_act_patch_attn_head_out_by_pos", "attn.z", ("layer", "pos", "head")),
        ("get_act_patch_attn_head_v_all_pos", "attn.v", ("layer", "kv_head")),
        ("get_act_patch_attn_head_pattern_by_pos", "attn.pattern", ("layer", "head", "query_pos")),
    ],
)
def test_grid_equals_one_forward_per_cell(setup, name, site_name, grid_axes):
    model, params, _, corrupted, cache, metric = setup
    result = getattr(patching, name)(model, params, corrupted, cache, metric, progress=False,
                                     chunk_size=5)
    assert result.axes == grid_axes
    expected = _loop_reference(model, params, corrupted, cache, metric, site_name, grid_axes)
    np.testing.assert_allclose(result.values, expected, atol=1e-5)


def test_patching_everything_restores_the_clean_metric(setup):
    model, params, clean, corrupted, cache, metric = setup
    result = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                              progress=False)
    apply = jax.jit(model.apply)
    clean_value = metric(apply({"params": params}, clean))
    corrupt_value = metric(apply({"params": params}, corrupted))
    # at layer 0 the only changed position is 2: patching it restores the clean run exactly
    np.testing.assert_allclose(result.values[0, 2], clean_value, atol=1e-5)
    # positions after the answer-irrelevant ones change nothing before position 2
    np.testing.assert_allclose(result.values[0, :2], corrupt_value, atol=1e-5)
    normalized = patching.normalized_effect(result, clean_value, corrupt_value)
    np.testing.assert_allclose(normalized.values[0, 2], 1.0, atol=1e-4)
    np.testing.assert_allclose(normalized.values[0, :2], 0.0, atol=1e-4)


def test_metric_on_selected_logits_equals_full_logits(setup):
    model, params, clean, _, _, _ = setup
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, clean)
    answer = jnp.array([3, 9, 27])
    per_example_pos = jnp.array([5, 3, -1])
    for metric in [
        metrics.logit_diff(answer, answer + 1, pos=per_example_pos),
        metrics.logprob(answer, pos=-2),
        metrics.accuracy(jnp.argmax(logits[:, -1], -1)),
        metrics.kl(logits * 0.5, pos=per_example_pos),
    ]:
        positions = metric.positions(BATCH, SEQ)
        selected = apply({"params": params}, clean, logit_positions=positions)
        assert selected.shape == (BATCH, 1, VOCAB)
        np.testing.assert_allclose(metric.on_selected(selected), metric(logits), rtol=1e-6)
    # known values
    np.testing.assert_allclose(metrics.accuracy(jnp.argmax(logits[:, -1], -1))(logits), 1.0)
    np.testing.assert_allclose(metrics.kl(logits)(logits), 0.0, atol=1e-6)
    expected = (logits[jnp.arange(3), per_example_pos % SEQ, answer]
                - logits[jnp.arange(3), per_example_pos % SEQ, answer + 1]).mean()
    np.testing.assert_allclose(metrics.logit_diff(answer, answer + 1, pos=per_example_pos)(logits),
                               expected, rtol=1e-6)


def test_block_every_stacks_three_grids(setup):
    model, params, _, corrupted, cache, metric = setup
    every = patching.get_act_patch_block_every(model, params, corrupted, cache, metric,
                                               progress=False)
    assert every.shape == (3, N_LAYERS, SEQ)
    mlp = patching.get_act_patch_mlp_out(model, params, corrupted, cache, metric, progress=False)
    np.testing.assert_allclose(every.values[2], mlp.values, atol=1e-6)
    frame = every.to_pandas()
    assert list(frame.columns) == ["act", "layer", "pos", "metric"] and len(frame) == 3 * N_LAYERS * SEQ


# ---------------------------------------------------------------------------------------
# Bad input: clear errors before any compile.


def test_missing_site_in_clean_cache(setup):
    model, params, clean, corrupted, _, metric = setup
    _, partial_cache = mi.capture(model, params, clean, sites=["resid_pre"])
    with pytest.raises(KeyError, match="the clean cache has no 'attn_out'"):
        patching.get_act_patch_attn_out(model, params, corrupted, partial_cache, metric)


def test_clean_and_corrupted_shapes_must_match(setup):
    model, params, _, corrupted, cache, metric = setup
    with pytest.raises(ValueError, match=r"source for site 'resid_pre' has shape \(2, 3, 6, 32\), expected \(2, 3, 5, 32\)"):
        patching.get_act_patch_resid_pre(model, params, corrupted[:, :5], cache, metric)


def test_metric_must_return_a_scalar(setup):
    model, params, _, corrupted, cache, _ = setup
    with pytest.raises(ValueError, match="must return a scalar, got shape"):
        patching.get_act_patch_resid_pre(model, params, corrupted, cache, lambda logits: logits[:, -1, 0])


def test_unknown_grid_axis_and_site(setup):
    from mechinterp.sweep import sweep

    model, params, _, corrupted, cache, metric = setup
    with pytest.raises(ValueError, match=r"grid axes \['heads'\] are not axes of site 'attn.z'"):
        sweep(model, params, (corrupted,), "attn.z", ("layer", "heads"), cache["attn.z"], metric)
    with pytest.raises(KeyError, match="unknown site 'attn.zz'"):
        sweep(model, params, (corrupted,), "attn.zz", ("layer",), cache["attn.z"], metric)
