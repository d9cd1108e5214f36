"""report.md of the recall-vs-reasoning run: puzzles, accuracies, circuits, the 2x2
dissociation and the paper's claims against ours (seed means; ± over seeds when there are
several, else the per-item s.e. / sd over random sets)."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.kit.circuits import LEVELS
from mechinterp.experiments.recall_reasoning.puzzles import TASKS

m = kit.mean_of


def _drop(x, se=None, ci=None) -> str:
    if kit.is_stat(x) and x["n"] > 1:
        return kit.pm(x, "+.3f")
    if ci is not None:  # a bootstrap interval over items
        return f"{m(x):+.3f} [{m(ci[0]):+.3f}, {m(ci[1]):+.3f}]"
    return f"{m(x):+.3f}" + ("" if se is None else f" ± {m(se):.3f}")


def dissociation_markdown(rows: list[dict]) -> list[str]:
    """The 2x2 table; rows with bootstrap intervals (``own_ci`` ...) show them in [ ]."""
    return kit.table(
        ["method", "level", "circuit (k)", "own-task drop", "other-task drop", "selectivity",
         "random k: own drop", "random k: other drop", "random selectivity"],
        [(r["method"], r["level"], f"{r['circuit']} ({m(r['k']):.3g})",
          _drop(r["own_drop"], r["own_se"], r.get("own_ci")),
          _drop(r["other_drop"], r["other_se"], r.get("other_ci")),
          _drop(r["selectivity"], ci=r.get("selectivity_ci")),
          _drop(r["random_own_drop"], r["random_own_sd"]),
          _drop(r["random_other_drop"], r["random_other_sd"]),
          _drop(r["random_selectivity"], r["random_selectivity_sd"])) for r in rows])


def _holds(rec: dict, rea: dict) -> tuple[bool, bool]:
    """(double dissociation: both selectivities > 0; both circuits beat random sets of
    equal size by more than one sd) on one seed's rows."""
    double = rec["selectivity"] > 0 and rea["selectivity"] > 0
    beats = all(r["own_drop"] > r["random_own_drop"] + r["random_own_sd"] for r in (rec, rea))
    return double, beats


def claims(results: dict, unit: str = "seeds") -> list[kit.Claim]:
    """Per family and method: the double dissociation at each level, and whether neurons
    are weaker. Judged on every seed (``unit`` names them); reproduced = in every seed."""
    out = []
    for family, agg in results["families"].items():
        runs = [s["dissociation"] for s in results["per_seed"][family]]
        for method in sorted({r["method"] for r in agg["dissociation"]}):
            def pick(rows, level, task):
                return next(r for r in rows if (r["method"], r["level"], r["circuit"])
                            == (method, level, task))
            for level in LEVELS:
                rec, rea = (pick(agg["dissociation"], level, t) for t in TASKS)
                held = [all(_holds(pick(rows, level, "recall"), pick(rows, level, "reasoning")))
                        for rows in runs]
                out.append(kit.Claim(
                    f"{family}, {method} ablation, {level}: each circuit cuts its own task "
                    "(recall up to 15%), the other stays intact, beyond random sets",
                    f"recall circuit: recall {_drop(rec['own_drop'])}, reasoning "
                    f"{_drop(rec['other_drop'])}; reasoning circuit: reasoning "
                    f"{_drop(rea['own_drop'])}, recall {_drop(rea['other_drop'])}",
                    all(held), f"{sum(held)}/{len(held)} {unit}: both selectivities > 0 and "
                    "both beat random by > 1 sd"))
            weaker = [np.mean([r["selectivity"] for r in rows if r["method"] == method
                               and r["level"] == "neuron"])
                      < np.mean([r["selectivity"] for r in rows if r["method"] == method
                                 and r["level"] == "head/layer"]) for rows in runs]
            sel = {lv: np.mean([m(r["selectivity"]) for r in agg["dissociation"]
                                if r["method"] == method and r["level"] == lv])
                   for lv in LEVELS}
            out.append(kit.Claim(f"{family}, {method}: neuron-level effects are weaker",
                                 f"mean selectivity neuron {sel['neuron']:+.3f} vs head/layer "
                                 f"{sel['head/layer']:+.3f}", all(weaker),
                                 f"{sum(weaker)}/{len(weaker)} {unit}"))
    return out


def circuits_markdown(name: str, circuits: dict, top: int | None = None) -> list[str]:
    """One line per level and task: the circuit's components with their PE (the first
    ``top`` of them, if given)."""
    return [f"- {name}, {level}, {task} ({len(found)}): " + ", ".join(
        f"{c['component']} ({c['pe']:.2f})" for c in found[:top])
        + (" ..." if top is not None and len(found) > top else "")
        for level, tasks in circuits.items() for task, found in tasks.items()]


def report_markdown(config, results: dict, twins: dict, timings: dict) -> str:
    fams, seeds, a = results["families"], results["seeds"], config.analysis
    lines = [
        "# Recall vs reasoning circuits (METHODS.md item 1, small scale)", "",
        f"Preset `{config.preset}`, families {', '.join(fams)}, training seeds {seeds} "
        f"(data seed {config.seed}); ± is the sd over seeds when there are several. Read "
        "`results.json` for every number (`per_seed` and seed aggregates), `results.npz` for "
        "the patching grids, `patching_<family>_<task>.png` for the first seed's heatmaps.",
        "", "## Against the paper's claims", "", *kit.claims_table(claims(results)), "",
        "## Puzzles", "",
        f"- recall (memorized fact, not in the prompt): `{' '.join(twins['recall'].words)}`"
        f"; twin changes the entity (position {int(twins['recall'].changed[0])}).",
        f"- reasoning ({config.data.chain_length - 1} hops over in-context premises, "
        f"{config.data.distractors} distractor chain(s), {config.data.holdout:.0%} of "
        f"(start, end) combinations test-only): `{' '.join(twins['reasoning'].words)}`; "
        "twin changes the queried chain's last premise's object.",
        f"- {a.n_items} twin pairs per task from the test split; metric logit_diff(clean "
        "answer, corrupted answer) at the answer position.", "",
        "## Accuracies (top-1 at the answer position)", ""]
    rows = []
    for family, r in fams.items():
        infos = [s["training"] for s in results["per_seed"][family]]
        reused = sum(i["reused_checkpoint"] for i in infos)
        rows.append((family, kit.pm(r["accuracy_test"]["recall"], ".3f"),
                     kit.pm(r["accuracy_test"]["reasoning"], ".3f"),
                     kit.pm(r["accuracy_train_items"]["reasoning"], ".3f"),
                     f"{len(infos) - reused} trained, {reused} reused", infos[0]["step"],
                     f"{sum(i['seconds'] for i in infos):.0f}"))
    lines += kit.table(["model", "recall (test)", "reasoning (test, held-out combos)",
                        "reasoning (train items)", "models", "steps", "train s"], rows)
    low = [f"{f}/{t}" for f, r in fams.items() for t, v in r["accuracy_test"].items()
           if m(v) < 0.9]
    if low:
        lines += ["", f"Below 0.9: {', '.join(low)}. Circuits of a task the model does not "
                  "solve are weak evidence: patching then measures partial (often heuristic) "
                  "mechanisms."]
    lines += ["", "Logit difference clean / corrupted:", ""]
    lines += [f"- {f}: " + "; ".join(f"{t} {m(v['clean']):.2f} / {m(v['corrupt']):.2f}"
                                     for t, v in r["logit_diff"].items())
              for f, r in fams.items()]
    lines += ["", f"## Circuits (seed {seeds[0]}; top components by PE)", "",
              f"Rule: components sorted by PE; the smallest k whose positive PE reaches "
              f"{a.coverage:.0%} (neurons {a.neuron_coverage:.0%}) of the total positive PE, "
              f"capped at {a.max_frac:.0%} (neurons {a.neuron_max_frac:.0%}) of the level's "
              "components, at least 1. Head/layer level = attention heads (`attn.z`) and "
              "whole MLP layers (`mlp_out`).", ""]
    for family in fams:
        lines += circuits_markdown(family, results["per_seed"][family][0]["circuits"])
    lines += ["", "## Dissociation (accuracy drops; with one seed ± is the paired s.e. over "
              f"items for circuits and the sd over {a.n_random} random sets of equal size for "
              "controls)", ""]
    for family, r in fams.items():
        lines += [f"### {family}", "", *dissociation_markdown(r["dissociation"]), ""]
    lines += ["Caveats: tiny models trained for minutes on synthetic tasks; the spread over "
              "seeds is over training runs on the same data and prompts; mean ablation uses "
              "the evaluated task's own per-position means.", "", "## Timings (s)", "",
              kit.timings_line(timings)]
    return "\n".join(lines)
