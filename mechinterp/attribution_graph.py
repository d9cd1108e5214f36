"""Attribution graphs over transcoder features (Ameisen et al. 2025, "Circuit Tracing";
the circuit-tracer library).

For one prompt, the *local replacement model* is the model with every MLP replaced by its
transcoder plus a constant error node, attention patterns frozen and norms linearised
(:class:`mechinterp.family.LinearisableNorms`). It is linear from the sources (token
embeddings, active features, error vectors) to the targets (feature pre-activations,
logits), so the direct effect ``A[t, s]`` of source ``s`` on target ``t`` is exact; rows of
``A`` are ``jax.vmap`` of one ``jax.vjp`` over chunks of targets. Node order
(circuit-tracer's): features, error nodes (``layer * n_pos + pos``), token nodes, logit
nodes. Position 0 (BOS) is excluded by default. Scores and pruning:
:mod:`mechinterp.attribution_graph_scores`. Definitions and design notes:
``docs/attribution_graphs.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import site_io
from mechinterp.attribution_graph_scores import (GraphScores, PrunedGraph,
                                                 cumulative_threshold, graph_scores,
                                                 influence, normalize_matrix, prune)
from mechinterp.family import (LinearisableNorms, SelectsOutputs, SublayerSites,
                               require)
from mechinterp.interventions import Intervention
from mechinterp.sites import INTERMEDIATES
from mechinterp.transcoders import Transcoder, apply_layers, mlp_sites, steer_features

Array = jax.Array
SCHEMA = "mechinterp.attribution_graph/1"


# ---------------------------------------------------------------------------------------
# The local replacement model.


__all__ = ["AttributionGraph", "GraphScores", "PrunedGraph", "actual_logit_effects",
           "attribute", "cumulative_threshold", "first_order_logit_effects", "graph_scores",
           "influence", "normalize_matrix", "plot", "predicted_logit_effects", "prune",
           "replacement_forward", "save_json", "select_logits", "to_json"]


def _mlp(model, needed_by: str = "attribution graphs") -> SublayerSites:
    """The MLP sublayer's sites, after checking the capabilities the graph needs."""
    for capability in (LinearisableNorms, SelectsOutputs):
        require(model, capability, needed_by)
    return mlp_sites(model, needed_by)


@flax.struct.dataclass
class _Prompt:
    """The clean run of one prompt: what the local replacement model freezes."""

    tokens: Array  # (1, T)
    embed: Array  # (T, d)
    pattern: Array  # (L, 1, H, T, T)
    mlp_out: Array  # (L, T, d)
    mlp_in: Array  # (L, T, d)
    logits: Array  # (V,) at the last position


def _clean_run(model, params, tokens: Array) -> _Prompt:
    mlp = _mlp(model)
    tokens = jnp.asarray(tokens)[None]
    logits, cache = site_io.capture(model, params, tokens,
                                sites=("embed", "attn.pattern", mlp.residual_in, mlp.output))
    mlp_in = model.sublayer_input(params, "mlp", cache[mlp.residual_in][:, 0])
    return _Prompt(tokens, cache["embed"][0], cache["attn.pattern"], cache[mlp.output][:, 0],
                   mlp_in, logits[0, -1])


def replacement_forward(model, params, prompt: _Prompt, embed: Array, mlp_write: Array
                        ) -> tuple[Array, Array]:
    """The local replacement model: ``(embed (T, d), mlp_write (L, T, d))`` ->
    ``(resid_mid (L, T, d), logits at the last position (V,))``, linear (affine) in its
    inputs, equal to the model's values at ``(prompt.embed, prompt.mlp_out)``."""
    mlp = _mlp(model, "replacement_forward")
    tokens = prompt.tokens
    kwargs = model.output_selection(jnp.full((1, 1), tokens.shape[1] - 1, jnp.int32))
    interventions = {
        "embed": Intervention.patch(embed[None]),
        "attn.pattern": Intervention.patch(jax.lax.stop_gradient(prompt.pattern)),
        mlp.output: Intervention.patch(mlp_write[:, None]),
    }
    variables, infos = site_io.intervention_variables(model, tokens, interventions=interventions,
                                                  **kwargs)
    with model.frozen_norms():
        logits, state = model.apply({"params": params, **variables}, tokens,
                                    mutable=[INTERMEDIATES], **kwargs)
    resid_mid = site_io.read_sites(state, infos, mlp.residual_in)[mlp.residual_in][:, 0]
    return resid_mid, logits[0, 0]


# ---------------------------------------------------------------------------------------
# The graph.


@dataclasses.dataclass
class AttributionGraph:
    """A prompt's attribution graph.

    ``adjacency[t, s]``: direct effect of source ``s`` on target ``t`` (node order above).
    ``features``: (S, 3) ``(layer, pos, feature)`` of the active features, with
    ``activations`` (S,). ``logit_tokens`` / ``logit_probabilities`` (K,): the target
    logits at the last position. ``target_values``: each feature's pre-activation and each
    target's demeaned logit on the prompt (rows of ``adjacency`` sum to these minus
    ``target_bias``, the constant part: biases of the encoder, decoder and attention, and
    with ``first_position_excluded`` the MLP outputs at position 0; ``docs/attribution_graphs.md``).
    """

    adjacency: np.ndarray
    features: np.ndarray
    activations: np.ndarray
    tokens: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    n_layers: int
    target_values: np.ndarray
    target_bias: np.ndarray
    token_strings: list[str] | None = None
    first_position_excluded: bool = False

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def error_node(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_node(self, k: int) -> int:
        return self.n_nodes - self.n_logits + k

    def feature_node(self, layer: int, pos: int, feature: int) -> int:
        hit = np.flatnonzero((self.features == (layer, pos, feature)).all(axis=1))
        if hit.size == 0 and pos == 0 and self.first_position_excluded:
            raise KeyError("features at position 0 are not nodes of this graph (built with "
                           "exclude_first_position=True)")
        if hit.size == 0:
            raise KeyError(f"feature {feature} at layer {layer}, position {pos} is not active "
                           "on this prompt, so it is not a node of the graph")
        return int(hit[0])

    def logit_weights(self) -> np.ndarray:
        w = np.zeros(self.n_nodes)
        w[self.n_nodes - self.n_logits:] = self.logit_probabilities
        return w

    def kinds(self) -> np.ndarray:
        return np.array(["feature"] * self.n_features + ["error"] * self.n_errors
                        + ["token"] * self.n_pos + ["logit"] * self.n_logits)


def select_logits(logits: Array, max_logits: int = 10, desired_probability: float = 0.95
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The most likely tokens, fewest first reaching ``desired_probability`` in total, at
    most ``max_logits``: ``(token ids, probabilities)`` (circuit-tracer's default)."""
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)), np.float64)
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), desired_probability) + 1)
    keep = order[:min(n, max_logits)]
    return keep, probs[keep]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("model",))
def _target_rows(model, params, tc_params, prompt: _Prompt, errors: Array, feats: Array,
                 activations: Array, logit_ids: Array, cotangents: Array):
    """Target values and the rows ``cotangents @ d targets / d sources`` of the adjacency
    (one ``vmap`` of one ``vjp``); targets = feature pre-activations, then demeaned logits."""
    encoder = tc_params["W_enc"][feats[:, 0], :, feats[:, 2]]  # (S, d)
    enc_bias = tc_params["b_enc"][feats[:, 0], feats[:, 2]]

    def targets(embed, mlp_write):
        resid_mid, logits = replacement_forward(model, params, prompt, embed, mlp_write)
        mlp_in = model.sublayer_input(params, "mlp", resid_mid, frozen=True)
        pre = jnp.sum(mlp_in[feats[:, 0], feats[:, 1]] * encoder, -1) + enc_bias
        return jnp.concatenate([pre, logits[logit_ids] - jnp.mean(logits)])

    values, pullback = jax.vjp(targets, prompt.embed, prompt.mlp_out)
    g_embed, g_mlp = jax.vmap(pullback)(cotangents)
    # Each source's written vector: a_s * w_dec,s (features), the error, the embedding.
    writes = tc_params["W_dec"][feats[:, 0], feats[:, 2]] * activations[:, None]
    from_features = jnp.einsum("csd,sd->cs", g_mlp[:, feats[:, 0], feats[:, 1]], writes)
    from_errors = jnp.einsum("cltd,ltd->clt", g_mlp, errors).reshape(len(cotangents), -1)
    from_tokens = jnp.einsum("ctd,td->ct", g_embed, prompt.embed)
    return values, jnp.concatenate([from_features, from_errors, from_tokens], axis=1)


def attribute(model, params, tokens, transcoder: Transcoder, tc_params, *,
              logit_tokens: Sequence[int] | None = None, max_logits: int = 10,
              desired_probability: float = 0.95, chunk_size: int = 64,
              token_strings: list[str] | None = None, exclude_first_position: bool = True
              ) -> AttributionGraph:
    """The attribution graph of ``tokens`` (T,) for the logits at the last position.

    ``logit_tokens``: target token ids (default: :func:`select_logits`). Rows of the
    adjacency are computed ``chunk_size`` targets at a time, each chunk one
    ``vmap(vjp)``; features and logits are padded to multiples of 32 and 8, so prompts of
    one length share a few compilations. ``exclude_first_position`` (default, as
    circuit-tracer): no feature nodes at position 0 and zero error vectors there, the MLP
    outputs at position 0 counting in ``target_bias`` (``docs/attribution_graphs.md``).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one prompt (T,), got shape {tokens.shape}; "
                         "build one graph per prompt")
    prompt = _clean_run(model, params, tokens)
    y_hat, acts = apply_layers(transcoder, tc_params, prompt.mlp_in)
    errors = prompt.mlp_out - y_hat
    features = np.argwhere(np.asarray(acts) > 0)  # (S, 3): layer, pos, feature
    if exclude_first_position:  # position 0's MLP output becomes part of the constant
        features = features[features[:, 1] > 0]
        errors = errors.at[:, 0].set(0.0)
    activations = np.asarray(acts)[tuple(features.T)]
    all_probs = np.asarray(jax.nn.softmax(prompt.logits.astype(jnp.float32)), np.float64)
    if logit_tokens is None:
        logit_tokens, probs = select_logits(prompt.logits, max_logits, desired_probability)
    else:
        logit_tokens = np.asarray(logit_tokens)
        probs = all_probs[logit_tokens]

    n_feat, n_logit = len(features), len(logit_tokens)
    s_pad, k_pad = _round_up(n_feat, 32), _round_up(n_logit, 8)
    feats = np.zeros((s_pad, 3), np.int32)
    feats[:n_feat] = features
    padded_acts = np.zeros(s_pad, np.float32)
    padded_acts[:n_feat] = activations
    logit_ids = np.zeros(k_pad, np.int32)
    logit_ids[:n_logit] = logit_tokens
    wanted = np.concatenate([np.arange(n_feat), s_pad + np.arange(n_logit)])
    chunk_size = max(1, min(chunk_size, len(wanted)))
    blocks, values = [], None
    for start in range(0, len(wanted), chunk_size):
        index = wanted[start:start + chunk_size]
        cot = np.zeros((chunk_size, s_pad + k_pad), np.float32)
        cot[np.arange(len(index)), index] = 1.0
        values, block = _target_rows(model, params, tc_params, prompt, errors,
                                     jnp.asarray(feats), jnp.asarray(padded_acts),
                                     jnp.asarray(logit_ids), jnp.asarray(cot))
        blocks.append(np.asarray(block)[:len(index)])
    block = np.concatenate(blocks)  # (targets, padded sources)
    sources = np.concatenate([np.arange(n_feat), s_pad + np.arange(block.shape[1] - s_pad)])
    target_rows = block[:, sources]

    graph = AttributionGraph(
        adjacency=np.zeros(()), features=features, activations=activations, tokens=tokens,
        logit_tokens=np.asarray(logit_tokens), logit_probabilities=np.asarray(probs),
        n_layers=model.layer_structure().n_layers,
        target_values=np.asarray(values, np.float64)[wanted],
        target_bias=np.zeros(()), token_strings=token_strings,
        first_position_excluded=exclude_first_position)
    adjacency = np.zeros((graph.n_nodes, graph.n_nodes))
    n_sources = target_rows.shape[1]
    adjacency[:n_feat, :n_sources] = target_rows[:n_feat]
    adjacency[graph.n_nodes - n_logit:, :n_sources] = target_rows[n_feat:]
    graph.adjacency = adjacency
    graph.target_bias = graph.target_values - target_rows.sum(axis=1)
    return graph



# ---------------------------------------------------------------------------------------
# Feature interventions: the graph's prediction against the model.


def predicted_logit_effects(graph: AttributionGraph, feature_nodes: Sequence[int],
                            deltas: Sequence[float], propagate: bool = True) -> np.ndarray:
    """Change of each target's demeaned logit predicted by the graph when the activations
    of ``feature_nodes`` change by ``deltas``.

    Per unit of activation, source ``s`` moves target ``t`` by ``J[t, s] = A[t, s] / a_s``.
    With ``propagate`` the change flows through downstream features, assumed to stay active
    with slope 1 (the local replacement model): ``d = (1 - J_ff)^{-1} d0``; the logit change
    is ``J_lf d``. Without it only the direct edges count.
    """
    nf = graph.n_features
    jac = graph.adjacency[:, :nf] / graph.activations[None, :]
    change = np.zeros(nf)
    change[list(feature_nodes)] = deltas
    if propagate:
        change = np.linalg.solve(np.eye(nf) - jac[:nf], change)
    return jac[graph.n_nodes - graph.n_logits:] @ change


def actual_logit_effects(model, params, graph: AttributionGraph, tc_params,
                         feature_nodes: Sequence[int], deltas: Sequence[float]) -> np.ndarray:
    """Change of each target's demeaned logit (last position) in the real decoder when
    ``delta * w_dec`` of each feature is added to its layer's MLP output at its position
    (:func:`mechinterp.transcoders.steer_features`)."""
    tokens = jnp.asarray(graph.tokens)[None]
    shape = (graph.n_layers, 1, graph.n_pos, tc_params["W_dec"].shape[-1])
    features = [tuple(int(v) for v in graph.features[i]) for i in feature_nodes]
    steer = {_mlp(model).output: steer_features(tc_params, features, deltas, shape)["mlp_out"]}
    base = site_io.intervene(model, params, tokens, interventions={})[0, -1]
    steered = site_io.intervene(model, params, tokens, interventions=steer)[0, -1]

    def demeaned(logits):
        return np.asarray(logits[graph.logit_tokens] - jnp.mean(logits), np.float64)
    return demeaned(steered) - demeaned(base)


@functools.partial(jax.jit, static_argnames=("model", "freeze_norms", "freeze_patterns"))
def _steered_logit_jvp(model, params, tokens, pattern, add, logit_ids, freeze_norms,
                       freeze_patterns):
    def demeaned_logits(eps):
        interventions = {_mlp(model).output: Intervention.steer(eps * add)}
        if freeze_patterns:
            interventions["attn.pattern"] = Intervention.patch(pattern)
        ivs, _ = site_io.intervention_variables(model, tokens, interventions=interventions)
        variables = {"params": params, **ivs}
        if freeze_norms:
            with model.frozen_norms():
                logits = model.apply(variables, tokens)[0, -1]
        else:
            logits = model.apply(variables, tokens)[0, -1]
        return logits[logit_ids] - jnp.mean(logits)
    return jax.jvp(demeaned_logits, (jnp.zeros(()),), (jnp.ones(()),))[1]


def first_order_logit_effects(model, params, graph: AttributionGraph, tc_params,
                              feature_nodes: Sequence[int], deltas: Sequence[float], *,
                              freeze_norms: bool = False, freeze_patterns: bool = False
                              ) -> np.ndarray:
    """The real decoder's first-order (JVP) change of each target's demeaned logit when
    ``delta * w_dec`` of each feature is added to ``mlp_out``, optionally with the norm
    factors and/or attention patterns frozen (MLPs stay real). Separates the graph's
    approximations: with both frozen, a last-layer feature's effect equals its direct edge."""
    tokens = jnp.asarray(graph.tokens)[None]
    shape = (graph.n_layers, 1, graph.n_pos, tc_params["W_dec"].shape[-1])
    features = [tuple(int(v) for v in graph.features[i]) for i in feature_nodes]
    add = steer_features(tc_params, features, deltas, shape)["mlp_out"].add
    _, cache = site_io.capture(model, params, tokens, sites=("attn.pattern",))
    return np.asarray(_steered_logit_jvp(model, params, tokens, cache["attn.pattern"], add,
                                         jnp.asarray(graph.logit_tokens), freeze_norms,
                                         freeze_patterns), np.float64)


# ---------------------------------------------------------------------------------------
# Export.


def _node(node_id: str, layer: int, pos: int, label: str, feature: int | None = None,
          activation: float | None = None) -> dict[str, Any]:
    return {"node_id": node_id, "layer": layer, "pos": pos, "feature": feature,
            "activation": activation, "label": label}


def _node_label(graph: AttributionGraph, i: int, kind: str) -> dict[str, Any]:
    if kind == "feature":
        layer, pos, feature = (int(v) for v in graph.features[i])
        return _node(f"f{layer}.{pos}.{feature}", layer, pos, f"L{layer} #{feature}",
                     feature, float(graph.activations[i]))
    if kind == "error":
        layer, pos = divmod(i - graph.n_features, graph.n_pos)
        return _node(f"e{layer}.{pos}", layer, pos, f"err L{layer}")
    if kind == "token":
        pos = i - graph.n_features - graph.n_errors
        words = graph.token_strings
        return _node(f"t{pos}", -1, pos, words[pos] if words else str(int(graph.tokens[pos])))
    k = i - (graph.n_nodes - graph.n_logits)
    token = int(graph.logit_tokens[k])
    return _node(f"l{token}", graph.n_layers, graph.n_pos - 1, f"logit {token}",
                 activation=float(graph.logit_probabilities[k]))


def to_json(pruned: PrunedGraph, scores: GraphScores | None = None,
            vocabulary: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The pruned graph as plain data a browser viewer can read::

        {"metadata": {"schema": "mechinterp.attribution_graph/1", "prompt_tokens": [ids],
                      "prompt_strings": [..] | null, "n_layers", "logit_tokens",
                      "logit_probabilities", "scores": {"replacement", "completeness"},
                      "n_nodes_total", "n_edges_total", "first_position_excluded"},
         "nodes": [{"node_id", "kind": feature|error|token|logit, "layer" (-1 for tokens,
                    n_layers for logits), "pos", "feature" (or null), "activation"
                    (feature activation; probability for logits; null otherwise),
                    "influence", "label"}],
         "links": [{"source": node_id, "target": node_id, "weight": direct effect}]}
    """
    graph = pruned.graph
    kinds = graph.kinds()
    kept = np.flatnonzero(pruned.node_mask)
    nodes = []
    for i in kept:
        node = {"kind": str(kinds[i]), **_node_label(graph, int(i), str(kinds[i])),
                "influence": float(pruned.influence[i])}
        if kinds[i] == "logit" and vocabulary is not None:
            node["label"] = vocabulary(int(graph.logit_tokens[i - graph.n_nodes + graph.n_logits]))
        nodes.append(node)
    ids = {int(i): n["node_id"] for i, n in zip(kept, nodes, strict=True)}
    targets, sources = np.nonzero(pruned.edge_mask)
    links = [{"source": ids[int(s)], "target": ids[int(t)],
              "weight": float(graph.adjacency[t, s])} for t, s in zip(targets, sources, strict=True)]
    metadata = {
        "schema": SCHEMA,
        "prompt_tokens": [int(t) for t in graph.tokens],
        "prompt_strings": graph.token_strings,
        "n_layers": graph.n_layers,
        "logit_tokens": [int(t) for t in graph.logit_tokens],
        "logit_probabilities": [float(p) for p in graph.logit_probabilities],
        "scores": dataclasses.asdict(scores) if scores else None,
        "n_nodes_total": graph.n_nodes,
        "n_edges_total": int(np.count_nonzero(graph.adjacency)),
        "first_position_excluded": graph.first_position_excluded,
    }
    return {"metadata": metadata, "nodes": nodes, "links": links}


def save_json(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=1))


def plot(data: dict[str, Any], path: str | Path, title: str = "") -> None:
    """A static PNG of an exported graph: x = token position, y = layer (tokens at the
    bottom, logits on top); edge colour = sign (blue +, red -), width ~ |weight|."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = data["metadata"]
    n_layers, n_pos = meta["n_layers"], len(meta["prompt_tokens"])
    cells: dict[tuple[int, int], list[str]] = {}
    for node in data["nodes"]:
        cells.setdefault((node["layer"], node["pos"]), []).append(node["node_id"])
    where = {}  # nodes of one (layer, position) cell spread evenly across the cell
    for (layer, pos), ids in cells.items():
        offsets = np.linspace(-0.35, 0.35, len(ids)) if len(ids) > 1 else [0.0]
        for node_id, dx in zip(ids, offsets, strict=True):
            where[node_id] = (pos + dx, layer + 1)
    fig, ax = plt.subplots(figsize=(1.2 * n_pos + 2, 0.9 * (n_layers + 2) + 1))
    largest = max((abs(link["weight"]) for link in data["links"]), default=1.0) or 1.0
    for link in data["links"]:
        (x0, y0), (x1, y1) = where[link["source"]], where[link["target"]]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if link["weight"] > 0 else "tab:red",
                alpha=0.5, lw=0.3 + 3 * abs(link["weight"]) / largest, zorder=1)
    colours = {"feature": "tab:orange", "error": "tab:gray", "token": "tab:green",
               "logit": "tab:purple"}
    for node in data["nodes"]:
        x, y = where[node["node_id"]]
        ax.scatter([x], [y], s=60, color=colours[node["kind"]], zorder=2)
        if node["kind"] in ("token", "logit"):
            ax.annotate(node["label"], (x, y), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)
    ax.set_yticks(range(n_layers + 2),
                  ["tokens", *(f"L{i}" for i in range(n_layers)), "logits"])
    ax.set_xticks(range(n_pos), meta["prompt_strings"] or [str(t) for t in meta["prompt_tokens"]],
                  rotation=45, fontsize=8)
    scores = meta.get("scores")
    if scores:
        title = (f"{title}  replacement {scores['replacement']:.2f}, completeness "
                 f"{scores['completeness']:.2f}").strip()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
