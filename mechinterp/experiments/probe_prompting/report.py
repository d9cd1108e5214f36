"""``report.md``: the paper's claims next to ours (mean ± sd over seeds), then the first
seed's transcoders, graphs, ablation checks, probe categories and entity-swap transfer."""

from __future__ import annotations

import math

import numpy as np

from mechinterp import probe_prompting as P
from mechinterp.experiments import kit

# The paper's numbers (Gemma-2-2B, 26 layers; its authors' released analysis of the Dallas ->
# Oakland swap): 25 of the Dallas circuit's 39 features are in the Oakland circuit (0.64);
# mean layer 6.3 of those that transfer, 16.4 of those that do not.
PAPER = {"completeness": 0.83, "replacement": 0.54, "consistency_ratio": 2.3,
         "transfer": 0.64, "layer_transferred": 6.3, "layer_failed": 16.4, "n_layers": 26}
SCALE = "the paper's model's number, not a claim a tiny synthetic model tests"


def _f(x, unit: str = "") -> str:
    return "n/a" if math.isnan(kit.mean_of(x)) else kit.pm(x, ".3f", unit)


def _holds(x, y):  # x < y over the seed means; None where either is undefined
    x, y = kit.mean_of(x), kit.mean_of(y)
    return None if math.isnan(x - y) else bool(x < y)


def claims(config, s: dict, n_prompts: int) -> list[kit.Claim]:
    return [
        kit.Claim(f"Completeness (mean over {n_prompts} prompts)",
                  f"{_f(s['completeness'])} (paper {PAPER['completeness']})", None, SCALE),
        kit.Claim("Replacement (mean)", f"{_f(s['replacement'])} (paper "
                  f"{PAPER['replacement']})", None, SCALE),
        kit.Claim("peak-token consistency: supernodes beat geometric clusters (paper "
                  f"{PAPER['consistency_ratio']}x)", f"{_f(s['consistency_ratio'], 'x')} "
                  f"({_f(s['consistency_supernodes'])} vs {_f(s['consistency_geometric'])})",
                  _holds(1.0, s["consistency_ratio"]), "ratio > 1"),
        kit.Claim("entity-swap transfer: share of a circuit's features kept by the swapped "
                  f"prompt's circuit (paper {PAPER['transfer']})", f"{_f(s['transfer'])}; "
                  f"early layers (< n_layers/2) {_f(s['early_transfer'])}", None, SCALE),
        kit.Claim("features that transfer sit earlier than those that do not (paper mean "
                  f"layer {PAPER['layer_transferred']} vs {PAPER['layer_failed']} of "
                  f"{PAPER['n_layers']})", f"{_f(s['layer_transferred'])} vs "
                  f"{_f(s['layer_failed'])} of {config.model.n_layers}",
                  _holds(s["layer_transferred"], s["layer_failed"]), "mean layers")]


def report_markdown(config, results: dict, timings: dict) -> str:
    res, s, n_layers = results["per_seed"][0], results["summary"], config.model.n_layers
    tc, layers, lin = res["transcoders"], [f"L{i}" for i in range(n_layers)], s["linearization"]
    categories = [(c, *np.sum([st["counts"][c] for st in res["probe"]], axis=0).astype(int))
                  for c in P.CATEGORIES]
    by_position = np.sum([g["n_kept_by_position"] for g in res["graphs"]], axis=0)
    return "\n".join([
        "# Probe prompting on a two-hop model", "",
        (f"Preset `{config.preset}`, training seeds {results['seeds']}. A {n_layers}-layer "
         f"decoder (d_model {config.model.d_model}) trained on `<hop> CITY r0 r1 =` (capital "
         "of the state containing CITY) plus one-hop recall; two-hop accuracy over all "
         f"{config.data.n_entities} cities: **{_f(s['accuracy_two_hop'])}**."), "",
        "## The paper's claims and ours", "",
        *kit.claims_table(claims(config, s, len(res["graphs"]))), "",
        ("The paper's numbers are from a pretrained language model, its transcoders and "
         "natural-language prompts; ours from a tiny synthetic-vocabulary model: they check "
         "that the pipeline behaves sensibly and are not a replication. ± is the sd over "
         f"seeds; the sections below are seed {results['seeds'][0]}'s."), "",
        "## Transcoders (one per layer, test split)", "",
        (f"{config.transcoder.activation}, {config.transcoder.n_features} features, "
         f"{config.transcoder.steps} steps."), "",
        *kit.table(["layer", "FVE", "MSE", "L0", "dead"],
                   [(i, f"{tc['fve'][i]:.3f}", f"{tc['mse'][i]:.4g}", f"{tc['l0'][i]:.1f}",
                     f"{tc['dead_fraction'][i]:.3f}") for i in range(n_layers)]), "",
        (f"Next-token loss on answer tokens: clean {tc['loss_clean']:.4g}, all MLPs spliced "
         f"(no error term) {tc['loss_spliced']:.4g}, all MLPs zero-ablated "
         f"{tc['loss_ablated']:.4g}; loss recovered {tc['loss_recovered']:.3f}. With the "
         "error term the spliced model equals the original."), "",
        "## Graphs (JSON and PNG per prompt in `seedN/graphs/`)", "",
        *kit.table(["city", "replacement", "completeness", "active features", "kept features",
                    "kept edges"],
                   [(f"e{g['city']}", f"{g['replacement']:.3f}", f"{g['completeness']:.3f}",
                     g["n_features_active"], g["n_features_kept"], g["n_edges_kept"])
                    for g in res["graphs"]]), "",
        "## Feature ablations: graph prediction vs the real model", "",
        ("The most influential kept features of each graph, one at a time: the change of the "
         "top logit (demeaned) predicted by the graph (propagated through downstream features "
         "of the local replacement model: attention patterns, norms and error nodes frozen) "
         "against the real model with the decoder vector subtracted from `mlp_out`."), "",
        *kit.table(["activation removed", "n", "sign agreement", "Pearson r",
                    "median abs(predicted/actual)"],
                   [(f"{float(f):.0%}", f"{kit.mean_of(a['n']):.0f}", _f(a["sign"]),
                     _f(a["r"]), _f(a["ratio"])) for f, a in s["agreement"].items()]), "",
        (f"First order (JVP of the real model, {kit.mean_of(lin['n']):.0f} features): the "
         f"graph's prediction is a median {_f(lin['graph_ratio'], 'x')} the real first-order "
         f"effect (sign agreement {_f(lin['sign'])}); the real model with only its RMSNorm "
         f"factors frozen gives {_f(lin['frozen_norm_ratio'], 'x')}. Where both ratios are far "
         "from 1, the frozen norms, not the transcoders, account for the gap."), "",
        "## Probe prompting: category counts by layer (summed over prompts)", "",
        *kit.table(["category", *layers], categories), "",
        (f"Activation-profile similarity within groups: supernodes "
         f"{_f(s['similarity_supernodes'])}, geometric clusters "
         f"{_f(s['similarity_geometric'])}."), "",
        "### Entity-swap transfer", "",
        ("Each prompt's swapped version replaces the city by one whose state and capital "
         "differ too (the paper's Dallas -> Oakland), with its own graph pruned the same way. "
         "Transfer = share of the distinct (layer, feature) pairs kept in the prompt's graph "
         "that the swapped prompt's graph keeps too."), "",
        *kit.table(["prompt", "swapped", "features", "transfer", *layers,
                    "swapped replacement", "swapped completeness"],
                   [(f"e{t['city']}", f"e{t['swap']}", t["n_features"], _f(t["rate"]),
                     *map(_f, t["by_layer"]), f"{t['swap_replacement']:.3f}",
                     f"{t['swap_completeness']:.3f}") for t in res["transfer"]]), "",
        "By layer, mean over prompts: " + ", ".join(
            f"L{i} {_f(v)}" for i, v in enumerate(s["transfer_by_layer"])) + ".", "",
        ("Kept features by position, summed over the prompts' graphs: " + ", ".join(
            f"`{word}` {n}" for word, n in zip(res["template"], by_position, strict=True))
         + ". Only the positions before the city read the same tokens in a prompt and its "
         "swap (position 0 is no graph node); the paper's prompts put most of the template "
         "before the entity, ours puts the city third."), "",
        f"Timings: {kit.timings_line(timings)}.", ""])
