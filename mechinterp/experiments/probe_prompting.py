"""Probe prompting on a small two-hop model, end to end (METHODS.md item 2).

1. Train a LLaMA-style decoder on two-hop fact composition, ``<hop> e5 r0 r1 = e9``: read
   ``r0`` as "the state containing" and ``r1`` as "the capital of", so the prompt asks for
   the capital of the state containing city ``e5`` (plus one-hop recall ``e5 r0 = e3`` so
   the single facts are learned too; :class:`mechinterp.train.tasks.MultiHop`).
2. Train one transcoder per layer on activations streamed from the model, with
   :func:`mechinterp.train.fit` (:func:`mechinterp.train.transcoders.train_transcoders`; TopK
   with AuxK; run folder ``transcoders/``); report FVE, L0, dead features and the loss
   with the transcoders spliced in.
3. Build attribution graphs (:mod:`mechinterp.attribution_graph`) for a few correctly
   answered prompts and for each one's entity-swapped version (:func:`entity_swap`);
   prune; Replacement and Completeness; JSON + PNG per prompt.
4. Ablate each graph's most influential features one at a time (all, and 10%, of their
   activation) in the real model and compare with the graph's prediction (sign agreement,
   correlation, size ratio).
5. Probe prompting (:mod:`mechinterp.probe_prompting`): probes swap the city (every other
   entity) and the relations; signatures, ordered rules, supernodes; geometric baseline;
   entity-swap transfer (:func:`swap_transfer`): per prompt, the share of its circuit's
   features that the circuit of its entity-swapped version keeps too, by layer.

Writes ``report.md`` (ours next to the paper's numbers), ``results.json``,
``transcoders.npz`` (per-layer parameters, leading layer axis) and
``graphs/prompt_*.json|png``; the decoder's checkpoint is under ``models/llama``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mechinterp import attribution_graph as G
from mechinterp import probe_prompting as P
from mechinterp import transcoders as T
from mechinterp.experiments.kit.legacy import _get, _set, logits_of, train_family  # until ported
from mechinterp.train import transcoders as TT
from mechinterp.train.data import build_synthetic
from mechinterp.train.tasks import TaskMixture, mixture_from_config

FUNCTION_WORDS = {"<bos>", "<eos>", "<pad>", "<hop>", "<recall>", "=", ";"}
# The paper's transfer numbers (its authors' released analysis of the Dallas -> Oakland swap
# on Gemma-2-2B, 26 layers): 25 of the Dallas circuit's 39 features are in the Oakland
# circuit (0.64); mean layer 6.3 of those that transfer, 16.4 of those that do not.
PAPER = {"completeness": 0.83, "replacement": 0.54, "consistency_ratio": 2.3,
         "transfer": 0.64, "layer_transferred": 6.3, "layer_failed": 16.4, "n_layers": 26}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "mechinterp.experiments.probe_prompting:run"
    c.workdir = "runs/probe_prompting"
    c.seed = 0
    c.preset = "default"  # "default" | "smoke" (CI)
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.n_entities = 16
    c.data.n_relations = 2
    c.data.hop_weight = 3.0  # sampling weight of two-hop vs one-hop recall (1)
    c.data.seq_len = 8
    c.data.num_train = 8192
    c.data.num_test = 256

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64
    c.model.n_layers = 3
    c.model.n_heads = 4
    c.model.d_mlp = 128

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1500
    c.train.batch_size = 64
    c.train.learning_rate = 1e-2
    c.train.warmup_steps = 50

    c.transcoder = ml_collections.ConfigDict()
    c.transcoder.n_features = 256
    c.transcoder.activation = "topk"
    c.transcoder.k = 12
    c.transcoder.sparsity_coef = 1e-3
    c.transcoder.learning_rate = 3e-3
    c.transcoder.steps = 1500
    c.transcoder.batch_size = 64
    c.transcoder.aux_k = 32  # AuxK on features dead in the batch (0: off)
    c.transcoder.eval_batches = 4

    c.graph = ml_collections.ConfigDict()
    c.graph.n_prompts = 5
    c.graph.max_logits = 5
    c.graph.node_threshold = 0.8
    c.graph.edge_threshold = 0.98
    c.graph.n_ablated = 10  # most influential features ablated per prompt
    return c


PRESETS = {
    "default": {},
    "smoke": {
        "data.n_entities": 6, "data.num_train": 256, "data.num_test": 32,
        "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.d_mlp": 32,
        "train.steps": 16, "train.warmup_steps": 2, "train.batch_size": 16,
        "transcoder.n_features": 32, "transcoder.k": 4, "transcoder.steps": 10,
        "transcoder.batch_size": 8, "transcoder.eval_batches": 1,
        "graph.n_prompts": 2, "graph.n_ablated": 2,
    },
}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with its preset applied (keys set away from their default win)."""
    if config.preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {config.preset!r}")
    resolved = ml_collections.ConfigDict(config.to_dict())
    defaults = default_config()
    for key, value in PRESETS[config.preset].items():
        if _get(config, key) == _get(defaults, key):
            _set(resolved, key, value)
    return resolved


def make_mixture(config) -> TaskMixture:
    d = config.data
    return mixture_from_config(
        {"recall": {}, "hop": {"hops": 2, "scratchpad": False, "holdout": 0.0,
                               "weight": d.hop_weight}},
        knowledge={"n_entities": d.n_entities, "n_relations": d.n_relations},
        seq_len=d.seq_len, seed=config.seed)


def two_hop_prompts(mixture: TaskMixture, relations=("r0", "r1")):
    """Every city's prompt ``<bos> <hop> e r_a r_b =``: words, token ids (n, 6), answers."""
    tokenizer = mixture.tokenizer()
    table = mixture.knowledge.table(mixture.seed)
    ra, rb = (int(r[1:]) for r in relations)
    words = [["<bos>", "<hop>", f"e{e}", *relations, "="]
             for e in range(mixture.knowledge.n_entities)]
    tokens = np.stack([tokenizer.encode(w) for w in words]).astype(np.int32)
    answers = np.array([tokenizer.encode([f"e{table[table[e, ra], rb]}"])[0]
                        for e in range(len(words))])
    return words, tokens, answers


def entity_swap(mixture: TaskMixture, city: int, correct: np.ndarray,
                relations=("r0", "r1")) -> int:
    """The city of ``city``'s entity-swapped prompt: the same template with the city
    replaced so that the state and the capital change too (the paper's Dallas -> Oakland,
    Texas -> California, Austin -> Sacramento).

    The first city after ``city`` (cyclically) whose state and capital both differ, taking
    correctly answered prompts (``correct``, per city) first; if no city has both
    different, one with a different capital, then any other city.
    """
    n = mixture.knowledge.n_entities
    if n < 2:
        raise ValueError("an entity swap needs at least 2 entities")
    table = mixture.knowledge.table(mixture.seed)
    ra, rb = (int(r[1:]) for r in relations)
    state = table[:, ra]
    capital = table[state, rb]
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
    tokenizer = mixture.tokenizer()
    relations = [f"r{i}" for i in range(mixture.knowledge.n_relations)]
    words = [["<bos>", "<hop>", f"e{e}", "r0", "r1", "="]
             for e in range(mixture.knowledge.n_entities)]
    words += [["<bos>", "<hop>", f"e{city}", a, b, "="] for a in relations for b in relations
              if (a, b) != ("r0", "r1")]
    return words, np.stack([tokenizer.encode(w) for w in words]).astype(np.int32)


def train_transcoders(config, model, params, mixture: TaskMixture, builder, workdir: Path):
    """Per-layer transcoders trained by :func:`mechinterp.train.fit` on the decoder's
    activations over the training split (streamed: each step runs the decoder), then
    evaluated on ``transcoder.eval_batches`` test batches."""
    tc = config.transcoder
    tokenizer, table = mixture.tokenizer(), mixture.knowledge.table(mixture.seed)
    training = TT.TrainingConfig(
        n_features=tc.n_features, activation=tc.activation, k=tc.k,
        sparsity_coef=tc.sparsity_coef, learning_rate=tc.learning_rate, steps=tc.steps,
        batch_size=tc.batch_size, aux_k=tc.aux_k, seed=config.seed)
    trained = TT.train_transcoders(model, params, builder.as_data_source("train"), training,
                                  workdir / "transcoders", pad_id=tokenizer.pad_id,
                                  log_every=max(1, tc.steps // 10))

    def test_source(index):
        return mixture.example("test", index % config.data.num_test, tokenizer, table)
    test = T.activation_batches(test_source, tc.batch_size, tokenizer.pad_id, config.seed + 1)
    metrics = T.evaluate(model, params, trained.transcoder, trained.params,
                         [next(test) for _ in range(tc.eval_batches)])
    return trained, metrics


def intervention_agreement(model, params, graph: G.AttributionGraph, pruned: G.PrunedGraph,
                           tc_params, n_ablated: int, fraction: float = 1.0) -> list[dict]:
    """Remove ``fraction`` of the activation of each of the ``n_ablated`` most influential
    kept features, one at a time (1.0 = ablation): the graph's predicted change of the top
    logit (demeaned) against the real model's."""
    kept = np.flatnonzero(pruned.node_mask[:graph.n_features])
    order = kept[np.argsort(-pruned.influence[kept])][:n_ablated]
    rows = []
    for node in order:
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
    distinct ``(layer, feature)`` its pruned graph keeps (any position), the share also kept
    by the pruned graph of the entity-swapped prompt, overall (``rate``) and per layer
    (``by_layer``, NaN where the circuit has no feature), and the mean layer of the
    features that transfer and of those that do not (NaN when there are none)."""
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
    vocabulary = mixture.tokenizer().vocab
    feats = sorted(set(kept_features(graph, pruned)))
    words, tokens = probes_for(mixture, city)
    acts = P.probe_activations(model, params, trained.transcoder, trained.params, tokens)
    sigs = P.signatures(acts, words, feats, FUNCTION_WORDS)
    say = P.logit_lens_names(model, params, trained.params, feats, vocabulary)
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


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    config = resolve(config)
    workdir = Path(workdir)
    (workdir / "graphs").mkdir(parents=True, exist_ok=True)
    (workdir / "config.resolved.json").write_text(json.dumps(config.to_dict(), indent=2))
    started, timings = time.perf_counter(), {}
    stages = tqdm(total=5, desc="probe_prompting", disable=not config.progress)

    stages.set_postfix_str("train model")
    mixture = make_mixture(config)
    builder = build_synthetic(mixture, num_train=config.data.num_train,
                              num_test=config.data.num_test, data_dir=workdir / "data")
    vocabulary = mixture.tokenizer().vocab
    model, params, info = train_family(config, "llama", builder, len(vocabulary), workdir)
    words, tokens, answers = two_hop_prompts(mixture)
    logits = np.asarray(logits_of(model, params, tokens)[:, -1])
    correct = logits.argmax(-1) == answers
    timings["model"] = time.perf_counter() - started
    stages.update(1)

    stages.set_postfix_str("transcoders")
    t0 = time.perf_counter()
    trained, tc_metrics = train_transcoders(config, model, params, mixture, builder, workdir)
    np.savez(workdir / "transcoders.npz", **{k: np.asarray(v) for k, v in trained.params.items()})
    timings["transcoders"] = time.perf_counter() - t0
    stages.update(1)

    stages.set_postfix_str("graphs")
    t0 = time.perf_counter()
    order = np.concatenate([np.flatnonzero(correct), np.flatnonzero(~correct)])
    cities = [int(c) for c in order[:config.graph.n_prompts]]
    swaps = [entity_swap(mixture, city, correct) for city in cities]
    built = {}  # city -> (graph, pruned graph, scores); a swap may be a seed prompt too
    for city in dict.fromkeys(cities + swaps):
        graph = G.attribute(model, params, tokens[city], trained.transcoder, trained.params,
                            max_logits=config.graph.max_logits, token_strings=words[city])
        kept = G.prune(graph, config.graph.node_threshold, config.graph.edge_threshold)
        score = G.graph_scores(graph)
        data = G.to_json(kept, score, vocabulary=lambda i: vocabulary[i])
        G.save_json(data, workdir / "graphs" / f"prompt_e{city}.json")
        G.plot(data, workdir / "graphs" / f"prompt_e{city}.png", title=" ".join(words[city]))
        built[city] = (graph, kept, score)
    graphs, pruned, scores = (list(x) for x in zip(*(built[c] for c in cities), strict=True))
    timings["graphs"] = time.perf_counter() - t0
    stages.update(1)

    stages.set_postfix_str("interventions")
    t0 = time.perf_counter()
    agreement = [row for g, p in zip(graphs, pruned, strict=True) for fraction in (1.0, 0.1)
                 for row in intervention_agreement(model, params, g, p, trained.params,
                                                   config.graph.n_ablated, fraction)]
    timings["interventions"] = time.perf_counter() - t0
    stages.update(1)

    stages.set_postfix_str("probe prompting")
    t0 = time.perf_counter()
    studies = [probe_study(model, params, trained, mixture, g, p, city)
               for g, p, city in zip(graphs, pruned, cities, strict=True)]
    transfer = [{"city": city, "swap": swap,
                 "correct": [bool(correct[city]), bool(correct[swap])],
                 "swap_replacement": built[swap][2].replacement,
                 "swap_completeness": built[swap][2].completeness,
                 **swap_transfer(kept_features(*built[city][:2]),
                                 kept_features(*built[swap][:2]), model.config.n_layers)}
                for city, swap in zip(cities, swaps, strict=True)]
    timings["probe_prompting"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    stages.update(1)
    stages.close()

    results = {
        "config": config.to_dict(), "training": info,
        "accuracy_two_hop": float(correct.mean()), "cities": cities,
        "template": ["CITY" if w == f"e{cities[0]}" else w for w in words[cities[0]]],
        "transcoders": {k: np.asarray(v).tolist() for k, v in tc_metrics.items()},
        "transcoder_history_last": {k: np.asarray(v).tolist()
                                    for k, v in trained.history[-1].items()},
        "graphs": [{"city": c, "replacement": s.replacement, "completeness": s.completeness,
                    "n_features_active": g.n_features,
                    "n_features_kept": int(p.node_mask[:g.n_features].sum()),
                    "n_kept_by_position": np.bincount(
                        g.features[p.node_mask[:g.n_features], 1], minlength=g.n_pos).tolist(),
                    "n_edges_kept": int(p.edge_mask.sum())}
                   for c, s, g, p in zip(cities, scores, graphs, pruned, strict=True)],
        "agreement": agreement, "probe": studies, "transfer": transfer, "timings_s": timings,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_plain))
    (workdir / "report.md").write_text(report_markdown(config, results))
    return results


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (np.ndarray, jnp.ndarray)):
        return np.asarray(x).tolist()
    return str(x)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def agreement_stats(rows: list[dict]) -> dict:
    """Sign agreement, Pearson r and median |predicted| / |actual| of ablation rows."""
    predicted = np.array([r["predicted"] for r in rows])
    actual = np.array([r["actual"] for r in rows])
    if len(actual) < 3:
        return {"n": len(actual), "sign": float("nan"), "r": float("nan"),
                "ratio": float("nan")}
    return {"n": len(actual), "sign": float(np.mean(np.sign(predicted) == np.sign(actual))),
            "r": float(np.corrcoef(predicted, actual)[0, 1]),
            "ratio": float(np.median(np.abs(predicted) / np.maximum(np.abs(actual), 1e-12)))}


def linearization_stats(rows: list[dict]) -> dict:
    """Where the graph's prediction departs from the real model: median size ratios of the
    graph's prediction and of the norm-frozen first-order effect to the real first-order
    effect, and the graph's sign agreement with the real first-order effect."""
    graph = np.array([r["predicted"] for r in rows])
    real = np.array([r["first_order"] for r in rows])
    frozen = np.array([r["first_order_frozen_norms"] for r in rows])
    if not len(real):
        return {"n": 0, "graph_ratio": float("nan"), "frozen_norm_ratio": float("nan"),
                "sign": float("nan")}
    real_size = np.maximum(np.abs(real), 1e-12)
    return {"n": len(real), "graph_ratio": float(np.median(np.abs(graph) / real_size)),
            "frozen_norm_ratio": float(np.median(np.abs(frozen) / real_size)),
            "sign": float(np.mean(np.sign(graph) == np.sign(real)))}


def summary(results: dict, n_layers: int) -> dict:
    """The headline numbers of a run (means over prompts)."""
    agreement = {fraction: agreement_stats([r for r in results["agreement"]
                                            if r["fraction"] == fraction])
                 for fraction in (1.0, 0.1)}
    studies = results["probe"]
    early = [layer for layer in range(n_layers) if layer < n_layers / 2] or [0]
    ratios = [s["consistency"]["supernodes"] / s["consistency"]["geometric"] for s in studies
              if s["consistency"]["geometric"] > 0]
    return {
        "replacement": _mean([g["replacement"] for g in results["graphs"]]),
        "completeness": _mean([g["completeness"] for g in results["graphs"]]),
        "agreement": agreement,
        "linearization": linearization_stats([r for r in results["agreement"]
                                              if r["fraction"] == 1.0]),
        "consistency_supernodes": _mean([s["consistency"]["supernodes"] for s in studies]),
        "consistency_geometric": _mean([s["consistency"]["geometric"] for s in studies]),
        "consistency_ratio": _mean(ratios),
        "similarity_supernodes": _mean([s["similarity"]["supernodes"] for s in studies]),
        "similarity_geometric": _mean([s["similarity"]["geometric"] for s in studies]),
        "transfer": _mean([t["rate"] for t in results["transfer"]]),
        "transfer_by_layer": [_mean([t["by_layer"][layer] for t in results["transfer"]])
                              for layer in range(n_layers)],
        "early_transfer": _mean([t["by_layer"][layer] for t in results["transfer"]
                                 for layer in early]),
        "layer_transferred": _mean([t["mean_layer_transferred"] for t in results["transfer"]]),
        "layer_failed": _mean([t["mean_layer_failed"] for t in results["transfer"]]),
    }


def _f(x) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def report_markdown(config, results: dict) -> str:
    n_layers = config.model.n_layers
    s = summary(results, n_layers)
    tc = results["transcoders"]
    lines = [
        "# Probe prompting on a two-hop model",
        "",
        (f"Preset `{config.preset}`, seed {config.seed}. A {n_layers}-layer decoder "
        f"(d_model {config.model.d_model}) trained on `<hop> CITY r0 r1 =` (capital of the "
        f"state containing CITY) plus one-hop recall; two-hop accuracy over all "
        f"{config.data.n_entities} cities: **{results['accuracy_two_hop']:.3f}**. "
        f"Total time {results['timings_s']['total']:.0f} s."),
        "",
        "## Headline numbers (ours, measured here, next to the paper's)",
        "",
        "| quantity | ours | paper |",
        "|---|---|---|",
        (f"| Completeness (mean over {len(results['graphs'])} prompts) | "
        f"{_f(s['completeness'])} | {PAPER['completeness']} |"),
        f"| Replacement (mean) | {_f(s['replacement'])} | {PAPER['replacement']} |",
        (f"| peak-token consistency, supernodes / geometric clusters | "
        f"{_f(s['consistency_ratio'])}x ({_f(s['consistency_supernodes'])} vs "
        f"{_f(s['consistency_geometric'])}) | {PAPER['consistency_ratio']}x |"),
        (f"| entity-swap transfer: share of a circuit's features kept by the swapped "
         f"prompt's circuit | {_f(s['transfer'])} | {PAPER['transfer']} |"),
        (f"| ... of its early-layer features (< n_layers/2) | {_f(s['early_transfer'])} | "
         "n/a |"),
        (f"| mean layer of the features that transfer / that do not | "
         f"{_f(s['layer_transferred'])} / {_f(s['layer_failed'])} (of {n_layers}) | "
         f"{PAPER['layer_transferred']} / {PAPER['layer_failed']} (of {PAPER['n_layers']}) |"),
        "",
        ("The paper's numbers are from a pretrained language model, its transcoders and "
        "natural-language prompts; ours from a tiny synthetic-vocabulary model, so they "
        "check that the pipeline behaves sensibly; they are not a replication."),
        "",
        "## Transcoders (one per layer, test split)",
        "",
        (f"{config.transcoder.activation}, {config.transcoder.n_features} features, "
        f"{config.transcoder.steps} steps."),
        "",
        "| layer | FVE | MSE | L0 | dead |",
        "|---|---|---|---|---|",
        *[f"| {i} | {tc['fve'][i]:.3f} | {tc['mse'][i]:.4g} | {tc['l0'][i]:.1f} | "
          f"{tc['dead_fraction'][i]:.3f} |" for i in range(n_layers)],
        "",
        (f"Next-token loss on answer tokens: clean {tc['loss_clean']:.4g}, all MLPs spliced "
         f"(no error term) {tc['loss_spliced']:.4g}, all MLPs zero-ablated "
         f"{tc['loss_ablated']:.4g}; loss recovered {tc['loss_recovered']:.3f}. With the "
         "error term the spliced model equals the original."),
        "",
        "## Graphs",
        "",
        "| city | replacement | completeness | active features | kept features | kept edges |",
        "|---|---|---|---|---|---|",
        *[f"| e{g['city']} | {g['replacement']:.3f} | {g['completeness']:.3f} | "
          f"{g['n_features_active']} | {g['n_features_kept']} | {g['n_edges_kept']} |"
          for g in results["graphs"]],
        "",
        "JSON and PNG per prompt in `graphs/`.",
        "",
        "## Feature ablations: graph prediction vs the real model",
        "",
        ("The most influential kept features of each graph, one at a time: the change of "
         "the top logit (demeaned) predicted by the graph (propagated through downstream "
         "features of the local replacement model: attention patterns, norms and error "
         "nodes frozen) against the real model with the decoder vector subtracted from "
         "`mlp_out`."),
        "",
        "| activation removed | n | sign agreement | Pearson r | median abs(predicted/actual) |",
        "|---|---|---|---|---|",
        *[f"| {fraction:.0%} | {a['n']} | {_f(a['sign'])} | {_f(a['r'])} | {_f(a['ratio'])} |"
          for fraction, a in s["agreement"].items()],
        "",
        (f"First order (JVP of the real model, {s['linearization']['n']} features): the "
         f"graph's prediction is a median {_f(s['linearization']['graph_ratio'])}x the real "
         f"first-order effect (sign agreement {_f(s['linearization']['sign'])}); the real "
         f"model with only its RMSNorm factors frozen (MLPs and attention real) gives "
         f"{_f(s['linearization']['frozen_norm_ratio'])}x. Where both ratios are far from "
         "1, the frozen norms, not the transcoders, account for the gap."),
        "",
        "## Probe prompting",
        "",
        "Category counts by layer (summed over prompts):",
        "",
        "| category | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
        "|---|" + "---|" * n_layers,
    ]
    for category in P.CATEGORIES:
        counts = np.sum([st["counts"][category] for st in results["probe"]], axis=0)
        lines.append(f"| {category} | " + " | ".join(str(int(c)) for c in counts) + " |")
    lines += [
        "",
        (f"Activation-profile similarity within groups: supernodes "
        f"{_f(s['similarity_supernodes'])}, geometric clusters {_f(s['similarity_geometric'])}."),
        "",
        "### Entity-swap transfer",
        "",
        ("Each prompt's entity-swapped version is the same template with the city replaced "
         "by one whose state and capital differ too (the paper's Dallas -> Oakland); both "
         "get their own graph, pruned the same way. Transfer = share of the distinct "
         "(layer, feature) pairs kept in the prompt's graph (any position) that the swapped "
         "prompt's graph keeps too."),
        "",
        "| prompt | swapped | features | transfer | " + " | ".join(
            f"L{i}" for i in range(n_layers)) + " | swapped replacement | swapped completeness |",
        "|---|---|---|---|" + "---|" * n_layers + "---|---|",
        *[f"| e{t['city']} | e{t['swap']} | {t['n_features']} | {_f(t['rate'])} | "
          + " | ".join(_f(v) for v in t["by_layer"])
          + f" | {t['swap_replacement']:.3f} | {t['swap_completeness']:.3f} |"
          for t in results["transfer"]],
        "",
        "By layer, mean over prompts: " + ", ".join(
            f"L{i} {_f(v)}" for i, v in enumerate(s["transfer_by_layer"])) + ".",
        "",
        ("Kept features by position, summed over the prompts' graphs: " + ", ".join(
            f"`{word}` {n}" for word, n in zip(
                results["template"],
                np.sum([g["n_kept_by_position"] for g in results["graphs"]], axis=0),
                strict=True))
         + ". Only the positions before the city read the same tokens in a prompt and its "
         "swap (position 0 is no graph node); the paper's prompts put most of the template "
         "before the entity, ours puts the city third."),
        "",
        "## Timings (s)",
        "",
        ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)
