"""Cells whose intervention changes nothing are not run; the others start where they change."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp import metrics, patching
from mechinterp.interventions import Intervention
from mechinterp.site_io import SiteInfo
from mechinterp.sweep import grid_mask, sweep
from mechinterp.sweep_cells import first_changes, windows
from test_decoder import random_params
from test_sweep_reuse import BATCH, N_LAYERS, SEQ, VOCAB, _decoder, random_tokens

DIFFERS_AT = 3  # the one position where the corrupted tokens differ from the clean ones


@pytest.fixture(scope="module")
def pair():
    model = _decoder()
    clean = random_tokens(7)
    corrupted = clean.at[:, DIFFERS_AT].set((clean[:, DIFFERS_AT] + 9) % VOCAB)
    params = random_params(model, clean, seed=8)
    _, cache = mi.capture(model, params, clean, sites=["resid_pre", "attn.z"])
    metric = metrics.logit_diff(jnp.array([1, 2]), jnp.array([4, 5]))
    return model, params, corrupted, cache, metric


N_HEADS = 4
EXPECTED_SKIPS = {  # the prefix before DIFFERS_AT is the same in both runs at every layer
    "get_act_patch_resid_pre": N_LAYERS * DIFFERS_AT + (SEQ - DIFFERS_AT - 1),  # + layer 0
    "get_act_patch_attn_head_out_by_pos": N_LAYERS * DIFFERS_AT * N_HEADS,
    "get_act_patch_attn_head_out_all_pos": 0,
}


@pytest.mark.parametrize("name", EXPECTED_SKIPS)
def test_skipping_unchanged_cells_gives_every_cell_run_from_scratch(pair, name):
    model, params, corrupted, cache, metric = pair
    grid = getattr(patching, name)
    every = grid(model, params, corrupted, cache, metric, reuse=False, skip_unchanged=False,
                 progress=False)
    skipping = grid(model, params, corrupted, cache, metric, position_blocks=2,
                    progress=False)
    np.testing.assert_allclose(skipping.values, every.values, atol=1e-5)
    assert np.ptp(every.values) > 1e-4
    assert (skipping.cost["skipped"], every.cost["skipped"]) == (EXPECTED_SKIPS[name], 0)
    reused = grid(model, params, corrupted, cache, metric, position_blocks=2,
                  skip_unchanged=False, progress=False)
    assert skipping.cost["flops"] < reused.cost["flops"] <= every.cost["flops"]
    baseline = metric(model.apply({"params": params}, corrupted))
    flat = skipping.values.reshape(-1)
    assert np.sum(np.abs(flat - baseline) < 1e-6) >= EXPECTED_SKIPS[name]


def test_a_grid_of_no_ops_runs_no_cell(pair):
    model, params, _, cache, metric = pair
    clean = random_tokens(7)
    result = patching.get_act_patch_resid_pre(model, params, clean, cache, metric,
                                              progress=False)
    assert result.cost["skipped"] == N_LAYERS * SEQ and result.cost["chunks"] == 0
    assert np.ptp(result.values) == 0
    np.testing.assert_allclose(result.values, metric(model.apply({"params": params}, clean)),
                               atol=1e-6)


def test_first_changes_match_the_one_hot_masks():
    """Brute force: each cell's mask (grid_mask) against a random change map."""
    info = SiteInfo(name="attn.z", shape=(3, 2, 6, 4, 5),
                    axes=("layer", "batch", "pos", "head", "d_head"), dtype=np.float32,
                    meaning=None, paths=(), stacked=True)
    rng = np.random.default_rng(0)
    changed = rng.random(info.shape) < 0.02
    changed[1] = False  # a whole layer unchanged
    for grid_axes in [("layer", "head"), ("layer", "pos", "head"), ("pos",), ("head",)]:
        shape = [info.shape[info.axes.index(a)] for a in grid_axes]
        cells = np.array(list(itertools.product(*map(range, shape))), np.int32)
        got = first_changes(changed, info, grid_axes, cells)
        for cell, first in zip(cells, got):
            hit = changed & (np.asarray(grid_mask(info, grid_axes, jnp.asarray(cell))) > 0)
            where = np.flatnonzero(hit.any(axis=(0, 1, 3, 4)))
            assert first == (where[0] if len(where) else -1), (grid_axes, cell)


def test_windows_split_from_the_earliest_change():
    earliest = np.array([9, 9, 10, 13, 12, 11])
    got = windows(earliest, 14, 13, 4)
    assert {p: list(rows) for p, rows in got.items()} == {
        9: [0, 1], 10: [2], 11: [5], 12: [3, 4]}
    assert list(windows(earliest, 14, 0, 4)) == [0]  # the metric reads every position
    assert windows(np.zeros(0, np.int64), 14, 13, 4) == {}


def test_an_intervention_that_ignores_its_mask_is_refused(pair):
    model, params, corrupted, cache, metric = pair
    with pytest.raises(ValueError, match="where the mask is 0"):
        sweep(model, params, (corrupted,), "resid_pre", ("layer",), cache["resid_pre"],
              metric, make_intervention=lambda source, mask: Intervention.patch(source),
              progress=False)


def test_nan_activations_are_not_taken_for_an_unlocalized_intervention(pair):
    """NaN != NaN: the zero-mask check must still see a NaN left as it was."""
    model, params, corrupted, cache, metric = pair
    token = int(corrupted[0, -1])
    broken = {**params, "embedding": params["embedding"].at[token].set(jnp.nan)}
    result = patching.get_act_patch_resid_pre(model, broken, corrupted, cache, metric,
                                              progress=False)
    assert result.cost["skipped"] > 0 and np.isnan(result.values).any()
