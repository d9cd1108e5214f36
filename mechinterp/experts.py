"""Experts as components: usage statistics, expert patching grids, expert ablation and
forced routings for mixture-of-experts models (any model with the ``moe.*`` sites, e.g.
:class:`mechinterp.models.MoEDecoder`).

Key names: :func:`usage_from_weights` / :func:`expert_usage` (per layer and expert, the
share of tokens routed to it and its mean weight, from site ``moe.weights``);
:func:`get_act_patch_expert_out` and :func:`get_act_patch_expert_out_by_pos` (patch
``moe.expert_out`` clean into corrupted, TransformerLens argument order);
:func:`ablate_experts` (zero combine weights, no renormalization) and
:func:`force_routing`. Unknown experts or layers raise ``ValueError``.

Design notes: docs/analyses.md ("Experts as components"); the sites: docs/moe.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from mechinterp.site_io import Intervention, capture, intervene, list_sites
from mechinterp.patching import _grid

WEIGHTS = "moe.weights"


@dataclasses.dataclass
class ExpertUsage:
    """Routing statistics; ``nan`` marks an expert never routed (for ``mean_weight``) and a
    position or token id with no real token.

    ``fraction`` (layer, expert): share of tokens routed to the expert (each row sums to the
    mean number of experts per token, ``k`` for top-k routing). ``mean_weight`` (layer,
    expert): its mean combine weight over the tokens routed to it. ``by_position`` (layer,
    pos, expert) and ``by_token`` (token id, layer, expert): ``fraction`` restricted to one
    position or one token id; ``token_ids`` lists the ids, in increasing order.
    """

    fraction: np.ndarray
    mean_weight: np.ndarray
    by_position: np.ndarray
    by_token: np.ndarray
    token_ids: np.ndarray


def _share(routed: np.ndarray, real: np.ndarray, axes) -> np.ndarray:
    count = real.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return routed.sum(axis=axes) / count[..., None]


def usage_from_weights(weights, tokens=None, attention_mask=None) -> ExpertUsage:
    """:class:`ExpertUsage` from combine weights (layer, batch, pos, expert); ``tokens``
    (batch, pos) gives the per-token-id table, ``attention_mask`` (1 = real token) leaves
    padding out."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 4:
        raise ValueError(f"weights must be (layer, batch, pos, expert), got shape "
                         f"{weights.shape}")
    _, batch, length, _ = weights.shape
    real = (np.ones((batch, length)) if attention_mask is None
            else np.asarray(attention_mask, np.float64))
    routed = (weights > 0) * real[None, :, :, None]              # (layer, batch, pos, expert)
    fraction = _share(routed, real[None], (1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_weight = (weights * routed).sum((1, 2)) / routed.sum((1, 2))
    by_position = _share(routed.transpose(0, 2, 1, 3), real.T[None], 2)
    if tokens is None:
        ids, by_token = np.zeros(0, int), np.zeros((0, *fraction.shape))
    else:
        tokens = np.asarray(tokens)
        ids = np.unique(tokens[real > 0])
        by_token = np.stack([_share(routed * (tokens == i)[None, :, :, None],
                                    (real * (tokens == i))[None], (1, 2)) for i in ids]
                            ) if len(ids) else np.zeros((0, *fraction.shape))
    return ExpertUsage(fraction, mean_weight, by_position, by_token, ids)


def expert_usage(model, params, tokens, attention_mask=None, **model_kwargs) -> ExpertUsage:
    """Run ``model`` on ``tokens`` and return :func:`usage_from_weights` of its routing."""
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    _, sites = capture(model, params, tokens, sites=[WEIGHTS], **model_kwargs)
    return usage_from_weights(sites[WEIGHTS], tokens, attention_mask)


get_act_patch_expert_out = _grid("get_act_patch_expert_out", "moe.expert_out",
                                 ("layer", "expert"), "each expert's write at all positions")
get_act_patch_expert_out_by_pos = _grid("get_act_patch_expert_out_by_pos", "moe.expert_out",
                                        ("layer", "pos", "expert"),
                                        "each expert's write at each position")


def _weights_site(model, tokens, model_kwargs):
    sites = list_sites(model, tokens, **model_kwargs)
    if WEIGHTS not in sites:
        raise ValueError(f"{type(model).__name__} has no site {WEIGHTS!r}: expert "
                         "interventions need a mixture-of-experts model")
    info = sites[WEIGHTS]
    return info.shape[0], info.shape[-1]


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist: the model has {n_layers} MoE "
                         f"layers (0..{n_layers - 1})")


def _check_expert(layer: int, expert: int, n_layers: int, n_experts: int) -> None:
    _check_layer(layer, n_layers)
    if not 0 <= expert < n_experts:
        raise ValueError(f"expert {expert} does not exist in layer {layer}: it has "
                         f"{n_experts} experts (0..{n_experts - 1})")


def ablate_experts(model, params, tokens, experts: Iterable[tuple[int, int]],
                   **model_kwargs):
    """Outputs with each ``(layer, expert)`` in ``experts`` removed: its combine weight is
    zeroed at every position (the other experts' weights are kept as they are)."""
    n_layers, n_experts = _weights_site(model, tokens, model_kwargs)
    mask = np.zeros((n_layers, 1, 1, n_experts), np.float32)
    for layer, expert in experts:
        _check_expert(layer, expert, n_layers, n_experts)
        mask[layer, ..., expert] = 1.0
    return intervene(model, params, tokens, interventions={
        WEIGHTS: Intervention.zero(mask=mask)}, **model_kwargs)


def force_routing(model, params, tokens, layer: int, routing: Mapping[int, float],
                  **model_kwargs):
    """Outputs with layer ``layer`` routing every token to ``routing`` (expert -> combine
    weight; experts not named get weight 0), whatever its router chose."""
    n_layers, n_experts = _weights_site(model, tokens, model_kwargs)
    _check_layer(layer, n_layers)
    weights = np.zeros(n_experts, np.float32)
    for expert, weight in routing.items():
        _check_expert(layer, expert, n_layers, n_experts)
        weights[expert] = weight
    mask = np.zeros((n_layers, 1, 1, 1), np.float32)
    mask[layer] = 1.0
    return intervene(model, params, tokens, interventions={
        WEIGHTS: Intervention.patch(weights, mask=mask)}, **model_kwargs)
