"""The steps of one seed: prompts and entity swaps, transcoders, intervention checks,
probe studies, transfer, and the headline numbers."""

from __future__ import annotations

import math

import numpy as np

from mechinterp import attribution_graph as G
from mechinterp import probe_prompting as P
from mechinterp import transcoders as T
from mechinterp.experiments.kit.lm import hop_prompts
from mechinterp.train.tasks import TaskMixture, mixture_from_config
from mechinterp.train.transcoders import TrainingConfig, train_transcoders

FUNCTION_WORDS = {"<bos>", "<eos>", "<pad>", "<hop>", "<recall>", "=", ";"}


def make_mixture(config) -> TaskMixture:
    """One-hop recall, then two-hop composition (in this order: it fixes the data)."""
    d = config.data
    return mixture_from_config(
        {"recall": {}, "hop": {"hops": 2, "scratchpad": False, "holdout": 0.0,
                               "weight": d.hop_weight}},
        knowledge={"n_entities": d.n_entities, "n_relations": d.n_relations},
        seq_len=d.seq_len, seed=config.seed)


def two_hop_prompts(mixture: TaskMixture, relations=("r0", "r1")):
    """Every city's prompt ``<bos> <hop> e r_a r_b =``: words, token ids (n, 6), answers."""
    return hop_prompts(mixture, [(e, relations) for e in range(mixture.knowledge.n_entities)])


def entity_swap(mixture: TaskMixture, city: int, correct: np.ndarray,
                relations=("r0", "r1")) -> int:
    """The city of ``city``'s entity-swapped prompt (the paper's Dallas -> Oakland: state
    and capital change too): the first city after ``city`` (cyclically) whose state and
    capital both differ, correctly answered ones (``correct``, per city) first; failing
    that one with a different capital, then any other city."""
    n = mixture.knowledge.n_entities
    if n < 2:
        raise ValueError("an entity swap needs at least 2 entities")
    table = mixture.knowledge.table(mixture.seed)
    state = table[:, int(relations[0][1:])]
    capital = table[state, int(relations[1][1:])]
    others = [(city + k) % n for k in range(1, n)]
    tiers = [[c for c in others if state[c] != state[city] and capital[c] != capital[city]],
             [c for c in others if capital[c] != capital[city]], others]
    for tier in tiers:
        for wanted in (True, False):
            hits = [c for c in tier if bool(correct[c]) == wanted]
            if hits:
                return int(hits[0])
    raise AssertionError("unreachable: others is not empty")


def probes_for(mixture: TaskMixture, city: int):
    """The seed prompt's syntax with the city swapped for every entity, and with the
    relation chain swapped for every other chain: (words, tokens)."""
    relations = [f"r{i}" for i in range(mixture.knowledge.n_relations)]
    queries = [(e, ("r0", "r1")) for e in range(mixture.knowledge.n_entities)]
    queries += [(city, (a, b)) for a in relations for b in relations if (a, b) != ("r0", "r1")]
    return hop_prompts(mixture, queries)[:2]


def fit_transcoders(config, model, params, mixture: TaskMixture, builder, folder, seed: int):
    """Per-layer transcoders trained on activations streamed from the decoder over the
    training split (run folder ``folder``), then evaluated on test batches."""
    tc = config.transcoder
    tokenizer, table = mixture.tokenizer(), mixture.knowledge.table(mixture.seed)
    training = TrainingConfig(
        n_features=tc.n_features, activation=tc.activation, k=tc.k,
        sparsity_coef=tc.sparsity_coef, learning_rate=tc.learning_rate, steps=tc.steps,
        batch_size=tc.batch_size, aux_k=tc.aux_k, seed=seed)
    trained = train_transcoders(model, params, builder.as_data_source("train"), training,
                                folder, pad_id=tokenizer.pad_id,
                                log_every=max(1, tc.steps // 10))

    def test_source(index):
        return mixture.example("test", index % config.data.num_test, tokenizer, table)
    test = T.activation_batches(test_source, tc.batch_size, tokenizer.pad_id, seed + 1)
    metrics = T.evaluate(model, params, trained.transcoder, trained.params,
                         [next(test) for _ in range(tc.eval_batches)])
    return trained, metrics


def intervention_agreement(model, params, graph: G.AttributionGraph, pruned: G.PrunedGraph,
                           tc_params, n_ablated: int, fraction: float = 1.0) -> list[dict]:
    """Remove ``fraction`` of the activation of each of the ``n_ablated`` most influential
    kept features, one at a time (1.0 = ablation): the graph's predicted change of the top
    logit (demeaned) against the real model's."""
    kept = np.flatnonzero(pruned.node_mask[:graph.n_features])
    rows = []
    for node in kept[np.argsort(-pruned.influence[kept])][:n_ablated]:
        delta = [-fraction * float(graph.activations[node])]
        rows.append({
            "feature": [int(v) for v in graph.features[node]], "fraction": fraction,
            "predicted": float(G.predicted_logit_effects(graph, [node], delta)[0]),
            "predicted_direct": float(
                G.predicted_logit_effects(graph, [node], delta, propagate=False)[0]),
            "actual": float(G.actual_logit_effects(model, params, graph, tc_params, [node],
                                                   delta)[0]),
            **{name: float(G.first_order_logit_effects(
                model, params, graph, tc_params, [node], delta, freeze_norms=norms)[0])
               for name, norms in (("first_order", False), ("first_order_frozen_norms", True))}})
    return rows


def kept_features(graph: G.AttributionGraph, pruned: G.PrunedGraph) -> list[tuple[int, int]]:
    """``(layer, feature)`` of the features the pruned graph keeps (any position)."""
    features = graph.features[pruned.node_mask[:graph.n_features]]
    return [(int(layer), int(feature)) for layer, _, feature in features]


def swap_transfer(original: list[tuple[int, int]], swapped: list[tuple[int, int]],
                  n_layers: int) -> dict:
    """Entity-swap transfer of one prompt's circuit, as the paper measures it: of the
    distinct ``(layer, feature)`` its pruned graph keeps, the share also kept by the pruned
    graph of the entity-swapped prompt, overall (``rate``) and per layer (``by_layer``, NaN
    where the circuit has none), and the mean layer of the features that transfer and of
    those that do not (NaN when there are none)."""
    original, swapped = set(original), set(swapped)
    moved = [layer for layer, f in original if (layer, f) in swapped]
    stayed = [layer for layer, f in original if (layer, f) not in swapped]
    return {"rate": len(moved) / len(original) if original else float("nan"),
            "by_layer": list(P.transfer_by_layer(original, swapped, n_layers).values()),
            "n_features": len(original),
            "mean_layer_transferred": float(np.mean(moved)) if moved else float("nan"),
            "mean_layer_failed": float(np.mean(stayed)) if stayed else float("nan")}


def probe_study(model, params, trained, mixture, graph, pruned, city: int) -> dict:
    """Signatures, rules, supernodes and the geometric baseline for one seed prompt."""
    feats = sorted(set(kept_features(graph, pruned)))
    words, tokens = probes_for(mixture, city)
    acts = P.probe_activations(model, params, trained.transcoder, trained.params, tokens)
    sigs = P.signatures(acts, words, feats, FUNCTION_WORDS)
    say = P.logit_lens_names(model, params, trained.params, feats, mixture.tokenizer().vocab)
    labels = [P.classify(s, model.config.n_layers, FUNCTION_WORDS, say_name=n)
              for s, n in zip(sigs, say, strict=True)]
    groups = P.supernodes([(c, n) for c, n, _ in labels])
    decoder = np.stack([np.asarray(trained.params["W_dec"][l, f]) for l, f in feats])
    geometric = P.geometric_clusters(decoder, len(groups), seed=0)
    peaks = P.peak_tokens(acts, words, feats)
    profiles = np.stack([acts[:, l, :, f].ravel() for l, f in feats])
    return {
        "features": feats,
        "labels": [{"feature": list(f), "category": c, "name": n, "rule": r,
                    **{k: getattr(s, k) for k in ("peak_consistency", "distinct_peaks",
                                                   "function_share", "sparsity")}}
                   for f, (c, n, r), s in zip(feats, labels, sigs, strict=True)],
        "counts": P.category_counts([(c, n) for c, n, _ in labels], [f[0] for f in feats],
                                    model.config.n_layers),
        "n_supernodes": len(groups),
        "consistency": {"supernodes": P.group_peak_consistency(groups.values(), peaks),
                        "geometric": P.group_peak_consistency(geometric, peaks)},
        "similarity": {"supernodes": P.group_profile_similarity(groups.values(), profiles),
                       "geometric": P.group_profile_similarity(geometric, profiles)},
    }


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def agreement_stats(rows: list[dict]) -> dict:
    """Sign agreement, Pearson r and median |predicted| / |actual| of ablation rows."""
    predicted, actual = (np.array([r[k] for r in rows]) for k in ("predicted", "actual"))
    if len(actual) < 3:
        return {"n": len(actual), "sign": math.nan, "r": math.nan, "ratio": math.nan}
    return {"n": len(actual), "sign": float(np.mean(np.sign(predicted) == np.sign(actual))),
            "r": float(np.corrcoef(predicted, actual)[0, 1]),
            "ratio": float(np.median(np.abs(predicted) / np.maximum(np.abs(actual), 1e-12)))}


def linearization_stats(rows: list[dict]) -> dict:
    """Median size ratios of the graph's prediction and of the norm-frozen first-order
    effect to the real first-order effect, and the graph's sign agreement with it."""
    graph, real, frozen = (np.array([r[k] for r in rows]) for k in
                           ("predicted", "first_order", "first_order_frozen_norms"))
    if not len(real):
        return {"n": 0, "graph_ratio": math.nan, "frozen_norm_ratio": math.nan,
                "sign": math.nan}
    size = np.maximum(np.abs(real), 1e-12)
    return {"n": len(real), "graph_ratio": float(np.median(np.abs(graph) / size)),
            "frozen_norm_ratio": float(np.median(np.abs(frozen) / size)),
            "sign": float(np.mean(np.sign(graph) == np.sign(real)))}


def summary(res: dict, n_layers: int) -> dict:
    """The headline numbers of one seed (means over prompts)."""
    rows, studies, transfer = res["agreement"], res["probe"], res["transfer"]
    early = [layer for layer in range(n_layers) if layer < n_layers / 2] or [0]
    return {
        "accuracy_two_hop": res["accuracy_two_hop"],
        "replacement": _mean([g["replacement"] for g in res["graphs"]]),
        "completeness": _mean([g["completeness"] for g in res["graphs"]]),
        "agreement": {str(f): agreement_stats([r for r in rows if r["fraction"] == f])
                      for f in (1.0, 0.1)},
        "linearization": linearization_stats([r for r in rows if r["fraction"] == 1.0]),
        **{f"{k}_{g}": _mean([s[k][g] for s in studies])
           for k in ("consistency", "similarity") for g in ("supernodes", "geometric")},
        "consistency_ratio": _mean([s["consistency"]["supernodes"] / s["consistency"]
                                    ["geometric"] for s in studies
                                    if s["consistency"]["geometric"] > 0]),
        "transfer": _mean([t["rate"] for t in transfer]),
        "transfer_by_layer": [_mean([t["by_layer"][layer] for t in transfer])
                              for layer in range(n_layers)],
        "early_transfer": _mean([t["by_layer"][layer] for t in transfer for layer in early]),
        "layer_transferred": _mean([t["mean_layer_transferred"] for t in transfer]),
        "layer_failed": _mean([t["mean_layer_failed"] for t in transfer]),
    }
