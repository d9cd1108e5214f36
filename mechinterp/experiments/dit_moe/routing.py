"""DiT-MoE's specialization analysis on combine weights recorded at every sampler step.

``weights`` (step, layer, batch, pos, expert) from site ``moe.weights``; an expert is
*selected* where its weight is > 0. A usage profile is the share of selections each expert
gets (sums to 1). Preference for a factor (step, class, position) is the mean total-
variation distance between the profile within each of its values and the layer's overall
profile; a permutation null (the factor's values shuffled across samples) gives the level
finite samples reach by chance. Concentration at a step is the distance of that step's
profile from uniform (``1 / n_experts``).
"""

from __future__ import annotations

import numpy as np


def _profile(selected: np.ndarray, axes) -> np.ndarray:
    counts = selected.sum(axis=axes)
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1)


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(-1)


def preference(selected: np.ndarray, factor: str, labels=None) -> np.ndarray:
    """Per layer: mean TV distance between the usage profile within each value of
    ``factor`` (``"step"``, ``"class"``, ``"position"``) and the overall profile.
    ``selected``: (step, layer, batch, pos, expert) booleans; ``labels`` (batch,)."""
    overall = _profile(selected, (0, 2, 3))                      # (layer, E)
    if factor == "step":
        within = _profile(selected, (2, 3)).transpose(1, 0, 2)   # (layer, step, E)
    elif factor == "position":
        within = _profile(selected, (0, 2)).transpose(0, 1, 2)   # (layer, pos, E)
    elif factor == "class":
        within = np.stack([_profile(selected[:, :, labels == c], (0, 2, 3))
                           for c in np.unique(labels)], axis=1)  # (layer, class, E)
    else:
        raise ValueError(f"factor must be 'step', 'class' or 'position', got {factor!r}")
    return _tv(within, overall[:, None]).mean(-1)


def null_preference(selected: np.ndarray, factor: str, labels, seed: int) -> np.ndarray:
    """:func:`preference` with the factor's values shuffled across samples (batch)."""
    rng = np.random.default_rng(seed)
    if factor == "class":
        return preference(selected, "class", rng.permutation(labels))
    order = np.argsort(rng.random((selected.shape[2], selected.shape[0 if factor == "step"
                                                                       else 3])), axis=1)
    if factor == "step":   # each sample's steps permuted independently
        shuffled = np.stack([selected[order[b], :, b] for b in range(selected.shape[2])], 2)
    else:
        shuffled = np.stack([selected[:, :, b][:, :, order[b]]
                             for b in range(selected.shape[2])], 2)
    return preference(shuffled, factor)


def concentration_by_step(selected: np.ndarray) -> np.ndarray:
    """(layer, step): TV distance of each step's usage profile from uniform."""
    within = _profile(selected, (2, 3)).transpose(1, 0, 2)
    return _tv(within, np.full(within.shape[-1], 1 / within.shape[-1]))


def routing_summary(weights, labels, seed: int) -> dict:
    """Every number the report reads, from ``moe.weights`` over steps."""
    selected = np.asarray(weights) > 0
    out = {}
    for factor in ("step", "class", "position"):
        out[factor] = preference(selected, factor, labels).tolist()
        out[f"{factor}_null"] = null_preference(selected, factor, labels, seed).tolist()
    conc = concentration_by_step(selected)
    half = conc.shape[1] // 2
    out["concentration"] = conc.tolist()
    out["concentration_early"] = float(conc[:, :half].mean())  # steps at t > 1/2
    out["concentration_late"] = float(conc[:, half:].mean())
    return out
