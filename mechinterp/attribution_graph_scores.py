"""Influence, replacement and completeness scores and pruning of an attribution graph
(:class:`mechinterp.attribution_graph.AttributionGraph`), circuit-tracer's definitions, in
plain numpy (float64). Definitions: ``docs/attribution_graphs.md``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mechinterp.attribution_graph import AttributionGraph


def normalize_matrix(adjacency: np.ndarray) -> np.ndarray:
    """``|A|`` with each row divided by its sum (rows summing to 0 stay 0)."""
    absolute = np.abs(np.asarray(adjacency, np.float64))
    sums = absolute.sum(axis=1, keepdims=True)
    return np.divide(absolute, sums, out=np.zeros_like(absolute), where=sums > 0)


def influence(normalized: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w^T (Â + Â^2 + ...) = w^T ((1 - Â)^{-1} - 1)``: each node's total (normalized,
    indirect and direct) influence on the weighted targets."""
    n = len(normalized)
    total = np.linalg.solve((np.eye(n) - normalized).T, weights)
    return total - weights


def cumulative_threshold(scores: np.ndarray, share: float) -> float:
    """The smallest score kept when keeping the largest scores until their sum reaches
    ``share`` of the total."""
    ordered = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    total = ordered.sum()
    if total <= 0:
        return np.inf
    index = int(np.searchsorted(np.cumsum(ordered) / total, share))
    return float(ordered[min(index, len(ordered) - 1)])


@dataclasses.dataclass(frozen=True)
class GraphScores:
    replacement: float
    completeness: float


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Replacement and completeness scores (``docs/attribution_graphs.md``)."""
    normalized = normalize_matrix(graph.adjacency)
    weights = graph.logit_weights()
    infl = influence(normalized, weights)
    errors = slice(graph.n_features, graph.n_features + graph.n_errors)
    token_start = graph.n_features + graph.n_errors
    token_infl = infl[token_start: token_start + graph.n_pos].sum()
    error_infl = infl[errors].sum()
    non_error = 1.0 - normalized[:, errors].sum(axis=1)
    output = infl + weights
    return GraphScores(replacement=float(token_infl / (token_infl + error_infl)),
                       completeness=float((non_error * output).sum() / output.sum()))


@dataclasses.dataclass
class PrunedGraph:
    """Boolean ``node_mask`` (n_nodes,) and ``edge_mask`` (n_nodes, n_nodes) over the
    graph's nodes and ``adjacency`` entries, and every node's ``influence`` on the logits
    (unpruned graph)."""

    graph: AttributionGraph
    node_mask: np.ndarray
    edge_mask: np.ndarray
    influence: np.ndarray


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
          ) -> PrunedGraph:
    """Prune by cumulative influence (``docs/attribution_graphs.md``; circuit-tracer's
    defaults)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    weights = graph.logit_weights()
    node_infl = influence(normalize_matrix(graph.adjacency), weights)
    always = graph.n_features + graph.n_errors  # tokens and logits from here on
    node_mask = node_infl >= cumulative_threshold(node_infl[:always], node_threshold)
    node_mask[always:] = True

    pruned = graph.adjacency * node_mask[:, None] * node_mask[None, :]
    normalized = normalize_matrix(pruned)
    target_infl = influence(normalized, weights) + weights
    edge_scores = normalized * target_infl[:, None]
    edge_mask = (edge_scores >= cumulative_threshold(edge_scores, edge_threshold)) & (pruned != 0)

    while True:
        keep = node_mask.copy()
        keep[:always] &= edge_mask[:, :always].any(axis=0)  # has a kept outgoing edge
        keep[:graph.n_features] &= edge_mask[:graph.n_features].any(axis=1)  # and an incoming
        edge_mask &= keep[:, None] & keep[None, :]
        if (keep == node_mask).all():
            break
        node_mask = keep
    return PrunedGraph(graph, node_mask, edge_mask, node_infl)
