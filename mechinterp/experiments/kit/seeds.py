"""Training seeds as an axis: ``config.seeds = N`` trains N independent models (seeds
``config.seed``, ``config.seed + 1``, ...); :func:`aggregate` turns the per-seed results
into mean, spread and the per-seed values, and :func:`pm` prints them for a report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def train_seeds(config) -> list[int]:
    """The training seeds of a config: ``[seed, seed + 1, ..., seed + seeds - 1]``."""
    n = int(config.get("seeds", 1))
    if n < 1:
        raise ValueError(f"config.seeds must be >= 1, got {n}")
    return [int(config.seed) + i for i in range(n)]


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def aggregate(per_seed: Sequence) -> object:
    """Combine results of the same shape from several seeds.

    Numbers become ``{"mean", "std", "n", "values"}`` (``std``: sample standard deviation,
    ddof=1; 0 for one seed); dicts and lists are combined element-wise (same keys / length
    in every seed, else an error); other leaves (strings, bools) are kept when equal in
    every seed and listed per seed otherwise.
    """
    first = per_seed[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for other in per_seed[1:]:
            if list(other) != keys:
                raise ValueError(f"seeds have different keys: {keys} vs {list(other)}")
        return {k: aggregate([r[k] for r in per_seed]) for k in keys}
    if isinstance(first, (list, tuple)) and not isinstance(first, str):
        if any(len(r) != len(first) for r in per_seed):
            return list(per_seed)
        return [aggregate([r[i] for r in per_seed]) for i in range(len(first))]
    if all(_is_number(x) for x in per_seed):
        values = [float(x) for x in per_seed]
        finite = [v for v in values if math.isfinite(v)]
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
        return {"mean": float(np.mean(finite)) if finite else float("nan"), "std": std,
                "n": len(values), "values": values}
    if all(x == first for x in per_seed):
        return first
    return list(per_seed)


def is_stat(x) -> bool:
    return isinstance(x, Mapping) and set(x) == {"mean", "std", "n", "values"}


def mean_of(x) -> float:
    """The mean of an aggregated number (or the number itself)."""
    return float(x["mean"]) if is_stat(x) else float(x)


def pm(x, fmt: str = ".2f", unit: str = "") -> str:
    """``"0.83 ± 0.04 (3 seeds)"`` for an aggregated number, ``"0.83"`` for a plain one or
    one seed."""
    if not is_stat(x):
        return f"{x:{fmt}}{unit}"
    if x["n"] == 1:
        return f"{x['mean']:{fmt}}{unit}"
    return f"{x['mean']:{fmt}}{unit} ± {x['std']:{fmt.lstrip('+')}}{unit} ({x['n']} seeds)"
