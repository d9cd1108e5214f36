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


def _f(x) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _pm(x) -> str:
    return "n/a" if math.isnan(kit.mean_of(x)) else kit.pm(x, ".3f")


def claims(config, s: dict, n_prompts: int) -> list[kit.Claim]:
    m = {k: kit.mean_of(s[k]) for k in ("consistency_ratio", "layer_transferred",
                                         "layer_failed")}
    return [
        kit.Claim(f"Completeness (mean over {n_prompts} prompts)",
                  f"{_pm(s['completeness'])} (paper {PAPER['completeness']})", None, SCALE),
        kit.Claim("Replacement (mean)", f"{_pm(s['replacement'])} (paper "
                  f"{PAPER['replacement']})", None, SCALE),
        kit.Claim("peak-token consistency: supernodes beat geometric clusters (paper "
                  f"{PAPER['consistency_ratio']}x)", f"{_pm(s['consistency_ratio'])}x "
                  f"({_pm(s['consistency_supernodes'])} vs {_pm(s['consistency_geometric'])})",
                  None if math.isnan(m["consistency_ratio"]) else m["consistency_ratio"] > 1,
                  "ratio > 1"),
        kit.Claim("entity-swap transfer: share of a circuit's features kept by the swapped "
                  f"prompt's circuit (paper {PAPER['transfer']})",
                  f"{_pm(s['transfer'])}; early layers (< n_layers/2) "
                  f"{_pm(s['early_transfer'])}", None, SCALE),
        kit.Claim("features that transfer sit earlier than those that do not (paper mean "
                  f"layer {PAPER['layer_transferred']} vs {PAPER['layer_failed']} of "
                  f"{PAPER['n_layers']})", f"{_pm(s['layer_transferred'])} vs "
                  f"{_pm(s['layer_failed'])} of {config.model.n_layers}",
                  None if math.isnan(m["layer_transferred"] - m["layer_failed"])
                  else m["layer_transferred"] < m["layer_failed"], "mean layers"),
    ]


def report_markdown(config, results: dict, timings: dict) -> str:
    res, s, n_layers = results["per_seed"][0], results["summary"], config.model.n_layers
    first, tc, layers = results["seeds"][0], res["transcoders"], [f"L{i}" for i in range(n_layers)]
    agreement, lin = s["agreement"], s["linearization"]
    categories = [(c, *np.sum([st["counts"][c] for st in res["probe"]], axis=0).astype(int))
                  for c in P.CATEGORIES]
    by_position = np.sum([g["n_kept_by_position"] for g in res["graphs"]], axis=0)
    return "\n".join([
        "# Probe prompting on a two-hop model", "",
        (f"Preset `{config.preset}`, training seeds {results['seeds']}. A {n_layers}-layer "
         f"decoder (d_model {config.model.d_model}) trained on `<hop> CITY r0 r1 =` (capital "
         "of the state containing CITY) plus one-hop recall; two-hop accuracy over all "
         f"{config.data.n_entities} cities: **{_pm(s['accuracy_two_hop'])}**."), "",
        "## The paper's claims and ours", "", *kit.claims_table(claims(config, s,
                                                                      len(res["graphs"]))), "",
        ("The paper's numbers are from a pretrained language model, its transcoders and "
         "natural-language prompts; ours from a tiny synthetic-vocabulary model, so they check "
         "that the pipeline behaves sensibly; they are not a replication. Numbers with ± are "
         f"mean ± sd over seeds; the sections below are seed {first}'s."), "",
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
        "## Graphs", "",
        *kit.table(["city", "replacement", "completeness", "active features", "kept features",
                    "kept edges"],
                   [(f"e{g['city']}", f"{g['replacement']:.3f}", f"{g['completeness']:.3f}",
                     g["n_features_active"], g["n_features_kept"], g["n_edges_kept"])
                    for g in res["graphs"]]), "",
        f"JSON and PNG per prompt in `seed{first}/graphs/`.", "",
        "## Feature ablations: graph prediction vs the real model", "",
        ("The most influential kept features of each graph, one at a time: the change of the "
         "top logit (demeaned) predicted by the graph (propagated through downstream features "
         "of the local replacement model: attention patterns, norms and error nodes frozen) "
         "against the real model with the decoder vector subtracted from `mlp_out`."), "",
        *kit.table(["activation removed", "n", "sign agreement", "Pearson r",
                    "median abs(predicted/actual)"],
                   [(f"{float(f):.0%}", kit.mean_of(a["n"]), _pm(a["sign"]), _pm(a["r"]),
                     _pm(a["ratio"])) for f, a in agreement.items()]), "",
        (f"First order (JVP of the real model, {kit.mean_of(lin['n']):.0f} features): the "
         f"graph's prediction is a median {_pm(lin['graph_ratio'])}x the real first-order "
         f"effect (sign agreement {_pm(lin['sign'])}); the real model with only its RMSNorm "
         f"factors frozen (MLPs and attention real) gives {_pm(lin['frozen_norm_ratio'])}x. "
         "Where both ratios are far from 1, the frozen norms, not the transcoders, account "
         "for the gap."), "",
        "## Probe prompting", "", "Category counts by layer (summed over prompts):", "",
        *kit.table(["category", *layers], categories), "",
        (f"Activation-profile similarity within groups: supernodes "
         f"{_pm(s['similarity_supernodes'])}, geometric clusters "
         f"{_pm(s['similarity_geometric'])}."), "",
        "### Entity-swap transfer", "",
        ("Each prompt's entity-swapped version is the same template with the city replaced by "
         "one whose state and capital differ too (the paper's Dallas -> Oakland); both get "
         "their own graph, pruned the same way. Transfer = share of the distinct (layer, "
         "feature) pairs kept in the prompt's graph (any position) that the swapped prompt's "
         "graph keeps too."), "",
        *kit.table(["prompt", "swapped", "features", "transfer", *layers,
                    "swapped replacement", "swapped completeness"],
                   [(f"e{t['city']}", f"e{t['swap']}", t["n_features"], _f(t["rate"]),
                     *map(_f, t["by_layer"]), f"{t['swap_replacement']:.3f}",
                     f"{t['swap_completeness']:.3f}") for t in res["transfer"]]), "",
        "By layer, mean over prompts: " + ", ".join(
            f"L{i} {_pm(v)}" for i, v in enumerate(s["transfer_by_layer"])) + ".", "",
        ("Kept features by position, summed over the prompts' graphs: " + ", ".join(
            f"`{word}` {n}" for word, n in zip(res["template"], by_position, strict=True))
         + ". Only the positions before the city read the same tokens in a prompt and its "
         "swap (position 0 is no graph node); the paper's prompts put most of the template "
         "before the entity, ours puts the city third."), "",
        f"Timings: {kit.timings_line(timings)}.", ""])
