"""Activation-patching grids with TransformerLens's names, argument order and semantics.

``get_act_patch_resid_pre(model, params, corrupted_tokens, clean_cache, patching_metric)``
and its siblings (``get_act_patch_*``) run the corrupted input with the clean activation
patched in at each grid cell (denoising) and return the metric per cell, as
``transformer_lens.patching`` does, but as one vmapped, jitted computation
(:func:`mechinterp.sweep.sweep`). Swap clean and corrupted for noising. ``clean_cache``
comes from :func:`mechinterp.capture`; ``patching_metric`` is a callable on logits or a
:mod:`mechinterp.metrics` object.

Design notes (head_out, k/v and pattern grids, keyword arguments): docs/analyses.md
("Activation patching").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mechinterp.sweep import SweepResult, sweep


def _clean_value(cache: Mapping, site_name: str):
    if site_name not in cache:
        raise KeyError(
            f"the clean cache has no {site_name!r}; capture it with "
            f"mechinterp.capture(model, params, clean_tokens, sites=[{site_name!r}, ...])"
        )
    return cache[site_name]


def _grid(name: str, site_name: str, grid_axes: tuple[str, ...], what: str):
    def patch(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs):
        return sweep(
            model, params, (corrupted_tokens,), site_name, grid_axes,
            _clean_value(clean_cache, site_name), patching_metric, **kwargs,
        )

    shape = ", ".join(grid_axes)
    patch.sites = (site_name,)  # what the clean cache must hold (read by LanguageModel.patch)
    patch.__name__ = patch.__qualname__ = name
    patch.__doc__ = (
        f"Patch {what} (site {site_name!r}) from the clean cache into the corrupted run, one "
        f"cell at a time; returns the metric per cell, shape [{shape}]."
    )
    return patch


_BY_LAYER_POS = ("layer", "pos")

get_act_patch_resid_pre = _grid("get_act_patch_resid_pre", "resid_pre", _BY_LAYER_POS, "the residual stream before each layer")
get_act_patch_resid_mid = _grid("get_act_patch_resid_mid", "resid_mid", _BY_LAYER_POS, "the residual stream between attention and MLP")
get_act_patch_resid_post = _grid("get_act_patch_resid_post", "resid_post", _BY_LAYER_POS, "the residual stream after each layer")
get_act_patch_attn_out = _grid("get_act_patch_attn_out", "attn_out", _BY_LAYER_POS, "attention-layer outputs")
get_act_patch_mlp_out = _grid("get_act_patch_mlp_out", "mlp_out", _BY_LAYER_POS, "MLP outputs")

get_act_patch_attn_head_out_by_pos = _grid("get_act_patch_attn_head_out_by_pos", "attn.z", ("layer", "pos", "head"), "each head's output")
get_act_patch_attn_head_q_by_pos = _grid("get_act_patch_attn_head_q_by_pos", "attn.q", ("layer", "pos", "head"), "each head's queries")
get_act_patch_attn_head_k_by_pos = _grid("get_act_patch_attn_head_k_by_pos", "attn.k", ("layer", "pos", "kv_head"), "each key head's keys")
get_act_patch_attn_head_v_by_pos = _grid("get_act_patch_attn_head_v_by_pos", "attn.v", ("layer", "pos", "kv_head"), "each value head's values")
get_act_patch_attn_head_pattern_by_pos = _grid("get_act_patch_attn_head_pattern_by_pos", "attn.pattern", ("layer", "head", "query_pos"), "each head's attention pattern row"
)
get_act_patch_attn_head_pattern_dest_src_pos = _grid("get_act_patch_attn_head_pattern_dest_src_pos", "attn.pattern", ("layer", "head", "query_pos", "key_pos"), "single attention weights"
)

get_act_patch_attn_head_out_all_pos = _grid("get_act_patch_attn_head_out_all_pos", "attn.z", ("layer", "head"), "each head's output at all positions")
get_act_patch_attn_head_q_all_pos = _grid("get_act_patch_attn_head_q_all_pos", "attn.q", ("layer", "head"), "each head's queries at all positions")
get_act_patch_attn_head_k_all_pos = _grid("get_act_patch_attn_head_k_all_pos", "attn.k", ("layer", "kv_head"), "each key head at all positions")
get_act_patch_attn_head_v_all_pos = _grid("get_act_patch_attn_head_v_all_pos", "attn.v", ("layer", "kv_head"), "each value head at all positions")
get_act_patch_attn_head_pattern_all_pos = _grid("get_act_patch_attn_head_pattern_all_pos", "attn.pattern", ("layer", "head"), "each head's whole pattern")

get_act_patch_mlp_neuron = _grid("get_act_patch_mlp_neuron", "mlp.hidden", ("layer", "d_mlp"), "each MLP neuron at all positions")
get_act_patch_mlp_neuron_by_pos = _grid("get_act_patch_mlp_neuron_by_pos", "mlp.hidden", ("layer", "pos", "d_mlp"), "each MLP neuron at each position")


def _stack(results: list[SweepResult], names: list[str]) -> SweepResult:
    shapes = {r.shape for r in results}
    if len(shapes) != 1:
        raise ValueError(
            f"cannot stack grids of different shapes {sorted(shapes)}: with grouped-query "
            "attention the k/v grids have fewer heads; call the per-activation functions"
        )
    return SweepResult(
        np.stack([r.values for r in results]), ("act",) + results[0].axes,
        {"act": names, **results[0].labels},
    )


def get_act_patch_block_every(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs):
    """resid_pre, attn_out and mlp_out grids stacked: shape [3, layer, pos]."""
    fns = [get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out]
    results = [f(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs) for f in fns]
    return _stack(results, ["resid_pre", "attn_out", "mlp_out"])


get_act_patch_block_every.sites = ("resid_pre", "attn_out", "mlp_out")


def get_act_patch_attn_head_all_pos_every(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs):
    """out, q, k, v, pattern (all positions) stacked: shape [5, layer, head]."""
    fns = [get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
           get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
           get_act_patch_attn_head_pattern_all_pos]
    results = [f(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs) for f in fns]
    return _stack(results, ["output", "query", "key", "value", "pattern"])


get_act_patch_attn_head_all_pos_every.sites = ("attn.z", "attn.q", "attn.k", "attn.v",
                                               "attn.pattern")


def get_act_patch_attn_head_by_pos_every(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs):
    """out, q, k, v, pattern (by position) stacked: shape [5, layer, pos, head]."""
    fns = [get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
           get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos]
    results = [f(model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs) for f in fns]
    pattern = get_act_patch_attn_head_pattern_by_pos(
        model, params, corrupted_tokens, clean_cache, patching_metric, **kwargs
    )
    # pattern is indexed [layer, head, query_pos]; align it to [layer, pos, head]
    results.append(SweepResult(pattern.values.transpose(0, 2, 1), ("layer", "pos", "head")))
    return _stack(results, ["output", "query", "key", "value", "pattern"])


get_act_patch_attn_head_by_pos_every.sites = get_act_patch_attn_head_all_pos_every.sites


def normalized_effect(patched, clean_value, corrupted_value):
    """``(m_patched - m_corrupt) / (m_clean - m_corrupt)``: 0 = no effect, 1 = full recovery."""
    values = np.asarray(patched)
    normalized = (values - float(corrupted_value)) / (float(clean_value) - float(corrupted_value))
    if isinstance(patched, SweepResult):
        return SweepResult(normalized, patched.axes, patched.labels)
    return normalized
