"""Probe prompting on a small two-hop model, end to end (METHODS.md item 2); config in
``configs/probe_prompting.py``. Per training seed: train a decoder on ``<hop> e5 r0 r1 = e9``
("the capital of the state containing city e5") plus one-hop recall; one transcoder per
layer (``seedN/transcoders``); attribution graphs for a few prompts and their entity swaps
(``seedN/graphs``), pruned, scored; single-feature ablations in the real model against the
graphs' predictions; probe prompting (signatures, rules, supernodes, geometric baseline) and
entity-swap transfer. The data use ``config.seed``; the decoder, its transcoders and their
test batches the training seed. ``results.json``: ``per_seed`` results and their
``summary`` over seeds; ``report.md``: the paper's claims next to ours.
"""

from __future__ import annotations

import numpy as np

from mechinterp import attribution_graph as G
from mechinterp.experiments import kit
from mechinterp.experiments.kit import lm
from mechinterp.experiments.probe_prompting.analysis import (
    FUNCTION_WORDS, agreement_stats, entity_swap, fit_transcoders, intervention_agreement,
    kept_features, linearization_stats, make_mixture, probe_study, probes_for, summary,
    swap_transfer, two_hop_prompts)
from mechinterp.experiments.probe_prompting.report import PAPER, report_markdown

__all__ = ["FUNCTION_WORDS", "PAPER", "agreement_stats", "entity_swap", "fit_transcoders",
           "intervention_agreement", "kept_features", "linearization_stats", "make_mixture",
           "probe_study", "probes_for", "report_markdown", "run", "one_seed", "summary",
           "swap_transfer", "two_hop_prompts"]


@kit.job
def run(config, workdir) -> dict:
    """Every training seed end to end, then the summary over seeds and the report."""
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            mixture = make_mixture(config)
            builder = lm.build_data(mixture, config, r.workdir)
        seeds = kit.train_seeds(config)
        per_seed = [one_seed(config, r, mixture, builder, seed) for seed in seeds]
        results = {"seeds": seeds, "per_seed": per_seed, "summary": kit.aggregate(
            [summary(res, config.model.n_layers) for res in per_seed])}
        with r.phase("report"):
            r.write_results(results)
            r.write_report(report_markdown(config, results, r.timings))
    return results


def one_seed(config, r: kit.Run, mixture, builder, seed: int) -> dict:
    vocabulary, folder = mixture.tokenizer().vocab, r.workdir / f"seed{seed}"
    (folder / "graphs").mkdir(parents=True, exist_ok=True)
    with r.phase("model"):
        trained = lm.train_decoder(config, "llama", builder, len(vocabulary),
                                   r.workdir / "models" / "llama" / f"seed{seed}", seed=seed)
        model, params = trained.model, trained.params
        words, tokens, answers = two_hop_prompts(mixture)
        correct = np.asarray(lm.logits_of(model, params, tokens)[:, -1]).argmax(-1) == answers
    with r.phase("transcoders"):
        tcs, tc_metrics = fit_transcoders(config, model, params, mixture, builder,
                                          folder / "transcoders", seed)
        np.savez(folder / "transcoders.npz", **{k: np.asarray(v) for k, v in tcs.params.items()})
    with r.phase("graphs"):
        order = np.concatenate([np.flatnonzero(correct), np.flatnonzero(~correct)])
        cities = [int(c) for c in order[:config.graph.n_prompts]]
        swaps = [entity_swap(mixture, city, correct) for city in cities]
        built = {}  # city -> (graph, pruned graph, scores); a swap may be a seed prompt too
        for city in dict.fromkeys(cities + swaps):
            graph = G.attribute(model, params, tokens[city], tcs.transcoder, tcs.params,
                                max_logits=config.graph.max_logits, token_strings=words[city])
            kept = G.prune(graph, config.graph.node_threshold, config.graph.edge_threshold)
            score = G.graph_scores(graph)
            data = G.to_json(kept, score, vocabulary=lambda i: vocabulary[i])
            G.save_json(data, folder / "graphs" / f"prompt_e{city}.json")
            G.plot(data, folder / "graphs" / f"prompt_e{city}.png", title=" ".join(words[city]))
            built[city] = (graph, kept, score)
        graphs, pruned, scores = (list(x) for x in zip(*(built[c] for c in cities), strict=True))
    with r.phase("interventions"):
        agreement = [row for g, p in zip(graphs, pruned, strict=True) for fraction in (1.0, 0.1)
                     for row in intervention_agreement(model, params, g, p, tcs.params,
                                                       config.graph.n_ablated, fraction)]
    with r.phase("probe_prompting"):
        studies = [probe_study(model, params, tcs, mixture, g, p, city)
                   for g, p, city in zip(graphs, pruned, cities, strict=True)]
        transfer = [{"city": city, "swap": swap,
                     "correct": [bool(correct[city]), bool(correct[swap])],
                     "swap_replacement": built[swap][2].replacement,
                     "swap_completeness": built[swap][2].completeness,
                     **swap_transfer(kept_features(*built[city][:2]),
                                     kept_features(*built[swap][:2]), model.config.n_layers)}
                    for city, swap in zip(cities, swaps, strict=True)]
    return {
        "training": trained.info, "accuracy_two_hop": float(correct.mean()), "cities": cities,
        "template": ["CITY" if w == f"e{cities[0]}" else w for w in words[cities[0]]],
        "transcoders": {k: np.asarray(v).tolist() for k, v in tc_metrics.items()},
        "transcoder_history_last": {k: np.asarray(v).tolist()
                                    for k, v in tcs.history[-1].items()},
        "graphs": [{"city": c, "replacement": s.replacement, "completeness": s.completeness,
                    "n_features_active": g.n_features,
                    "n_features_kept": int(p.node_mask[:g.n_features].sum()),
                    "n_kept_by_position": np.bincount(
                        g.features[p.node_mask[:g.n_features], 1], minlength=g.n_pos).tolist(),
                    "n_edges_kept": int(p.edge_mask.sum())}
                   for c, s, g, p in zip(cities, scores, graphs, pruned, strict=True)],
        "agreement": agreement, "probe": studies, "transfer": transfer}
