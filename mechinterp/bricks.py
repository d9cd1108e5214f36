"""Neuron partitions ("bricks") of the MLP layers: task frequencies, specialization,
co-activation clusters and partition ablation.

After "Configurable Foundation Models: Building LLMs from a Modular Perspective" (Xiao et
al., 2024); the survey gives no recipe, so these forms are inferred (METHODS.md item 5).
A neuron is active when ``|mlp.hidden| > tau_l`` (a per-layer quantile);
``f[t, i]`` = share of task ``t``'s tokens on which neuron ``i`` is active and
``s[t, i] = f[t, i] - mean_{t' != t} f[t', i]``.

Key names: :func:`neuron_activations`, :func:`thresholds`, :func:`frequencies`,
:func:`specialization`, :func:`coactivation_partitions` (k-means on co-activation),
:func:`partition_ablation`. Neurons are indexed ``layer * d_mlp + unit``.

Design notes: docs/analyses.md ("Bricks").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from mechinterp.ablation import sweep_component_sets
from mechinterp.site_io import capture
from mechinterp.components import component
from mechinterp.llm_drop import token_batches

SITE = "mlp.hidden"


def neuron_activations(model, params, tokens, token_mask=None, batch_size: int = 64):
    """``|mlp.hidden|`` on the tokens where ``token_mask`` is true: ``(tokens, layers,
    d_mlp)`` float32."""
    rows = []
    for batch, mask in token_batches(tokens, token_mask, batch_size):
        _, acts = capture(model, params, batch, sites=[SITE])
        rows.append(np.abs(np.asarray(acts[SITE], np.float32))[:, mask].swapaxes(0, 1))
    return np.concatenate(rows)


def thresholds(acts_by_task: Mapping[str, np.ndarray], quantile: float = 0.5) -> np.ndarray:
    """Per-layer activity thresholds ``tau_l`` (see the module docstring)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if not acts_by_task:
        raise ValueError("no tasks given")
    pooled = np.concatenate(list(acts_by_task.values()))
    return np.quantile(pooled.swapaxes(0, 1).reshape(pooled.shape[1], -1), quantile, axis=1)


def frequencies(acts_by_task: Mapping[str, np.ndarray], tau: np.ndarray) -> np.ndarray:
    """``f[t, layer * d_mlp + unit]``: how often each neuron is active on each task's tokens
    (tasks in the mapping's order)."""
    return np.stack([(acts > tau[None, :, None]).mean(0).reshape(-1)
                     for acts in acts_by_task.values()])


def specialization(freq: np.ndarray) -> np.ndarray:
    """``s[t, i] = f[t, i] - mean_{t' != t} f[t', i]`` (needs two tasks or more)."""
    freq = np.asarray(freq, np.float64)
    n_tasks = freq.shape[0]
    if n_tasks < 2:
        raise ValueError(f"specialization compares tasks; got {n_tasks} task(s)")
    others = (freq.sum(0, keepdims=True) - freq) / (n_tasks - 1)
    return freq - others


def coactivation_partitions(active: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Partition labels (one per neuron) from k-means on co-activation profiles.

    ``active``: bool ``(tokens, neurons)``; each neuron's column is its profile."""
    from sklearn.cluster import KMeans

    active = np.asarray(active)
    if active.ndim != 2 or active.shape[0] == 0:
        raise ValueError(f"active must be (tokens, neurons) with tokens > 0, got {active.shape}")
    if not 1 <= k <= active.shape[1]:
        raise ValueError(f"k={k} partitions need 1 <= k <= {active.shape[1]} neurons")
    kmeans = KMeans(n_clusters=k, n_init=4, random_state=seed)
    return kmeans.fit_predict(active.T.astype(np.float32))


def neuron_set(neurons, d_mlp: int) -> list:
    """Components (``mlp.hidden`` at one layer and unit) for flat neuron indices."""
    return [component(SITE, layer=int(i) // d_mlp, d_mlp=int(i) % d_mlp) for i in neurons]


def partition_ablation(model, params, task_inputs: Mapping[str, np.ndarray],
                       task_metrics: Mapping[str, Callable], labels: np.ndarray, d_mlp: int,
                       n_random: int = 5, seed: int = 0) -> dict:
    """Each task's metric with each partition zeroed, and with random neuron sets of the
    same sizes: ``base`` (T,), ``ablated`` (T, P), ``random`` (T, P, n_random) and ``drop`` /
    ``random_drop`` = base minus those. ``task_inputs[t]`` are token ids, ``task_metrics[t]``
    maps the model's full logits on them to a scalar (e.g. accuracy); ``labels`` from
    :func:`coactivation_partitions`."""
    if set(task_inputs) != set(task_metrics) or not task_inputs:
        raise ValueError(f"task_inputs {sorted(task_inputs)} and task_metrics "
                         f"{sorted(task_metrics)} must name the same tasks (at least one)")
    labels = np.asarray(labels)
    parts = [np.flatnonzero(labels == p) for p in range(labels.max() + 1)]
    rng = np.random.default_rng(seed)
    sets = [[]] + [neuron_set(p, d_mlp) for p in parts] + [
        neuron_set(rng.choice(labels.size, size=len(p), replace=False), d_mlp)
        for p in parts for _ in range(n_random)]
    values = np.stack([
        np.asarray(sweep_component_sets(model, params, np.asarray(task_inputs[t]), sets,
                                        task_metrics[t], method="zero", progress=False).values)
        for t in task_inputs])
    base, ablated = values[:, 0], values[:, 1:1 + len(parts)]
    random = values[:, 1 + len(parts):].reshape(len(task_inputs), len(parts), n_random)
    return {"base": base, "ablated": ablated, "random": random,
            "drop": base[:, None] - ablated, "random_drop": base[:, None, None] - random,
            "sizes": np.array([len(p) for p in parts])}
