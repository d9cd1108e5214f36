"""Recall vs reasoning circuits (METHODS.md item 1) at small scale; config and presets in
``configs/recall_reasoning.py``.

Per family (LLaMA- and Qwen2-style decoders, :data:`~mechinterp.experiments.kit.lm.FAMILIES`)
and training seed: train (or reuse) the model on both tasks (:mod:`.puzzles`); patch every
grid of each task's twins (metric logit_diff(clean answer, corrupted answer) at the answer
position, normalized effect PE); pick each task's circuit at two levels by the coverage
rule (:mod:`mechinterp.experiments.kit.circuits`); ablate it (zero, and mean over the
evaluated task's own prompts) and measure top-1 answer accuracy on both tasks against
``n_random`` random sets of equal size. drop = unablated - ablated accuracy; selectivity =
own-task drop - other-task drop. Seeds give mean ± sd over independently trained models.
``preset=paper``: the same :func:`analyse` on a real checkpoint (:mod:`.paper`).

Ours, not the paper's (*inferred*): the tasks, the twins, "head/layer level" = heads plus
whole MLP layers, the coverage rule, mean ablation over the task's own prompts.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from mechinterp.experiments import kit
from mechinterp.experiments.kit import lm
from mechinterp.experiments.kit.circuits import (LEVELS, PATCH_GRIDS, ablation_study,
                                                 choose_circuits, dissociation,
                                                 level_components, level_effects, patch_grids,
                                                 plot_grids, select_circuit)
from mechinterp.experiments.recall_reasoning.puzzles import (TASKS, Twins, make_mixture,
                                                             make_twins)
from mechinterp.experiments.recall_reasoning.report import report_markdown
from mechinterp.metrics import logit_diff

__all__ = ["TASKS", "Twins", "make_mixture", "make_twins", "patch_task", "grid_names",
           "analyse", "analyse_trained", "run",
           "report_markdown", "LEVELS", "ablation_study", "choose_circuits", "dissociation",
           "level_components", "level_effects", "select_circuit"]  # the last: from the kit


def patch_task(model, params, twins: Twins, progress: bool = False, *,
               exact=tuple(PATCH_GRIDS), estimated=()) -> dict:
    """Every PE grid of one task's twins (``exact`` ones patched, ``estimated`` ones by
    attribution patching: :func:`~mechinterp.experiments.kit.circuits.patch_grids`) and
    the clean / corrupted metric values."""
    metric = logit_diff(twins.clean_answer, twins.corrupt_answer, pos=-1)
    return patch_grids(model, params, twins.clean, twins.corrupt, metric, progress,
                       exact=exact, estimated=estimated)


def grid_names(analysis) -> dict:
    """``patch_task`` keywords from the config's comma-separated ``analysis.grids`` and
    ``analysis.estimated_grids``."""
    def names(spec):
        return tuple(g.strip() for g in spec.split(",") if g.strip())
    return {"exact": names(analysis.grids), "estimated": names(analysis.estimated_grids)}


def analyse(model, params, twins: dict, config, r: kit.Run, name: str,
            seed: int) -> tuple[dict, dict]:
    """Any decoder (a trained tiny one or a real checkpoint) on ``twins`` (task -> Twins):
    patching grids, circuits and, with both tasks, the ablations' dissociation rows. ``seed``
    draws the random control circuits and the bootstrap: the training seed for a trained
    model, so each seed's controls are independent draws."""
    a, tasks = config.analysis, tuple(twins)
    with r.phase(f"{name}/patch"):
        patched = {task: patch_task(model, params, twins[task], **grid_names(a)) for task in tasks}
    out = {"estimated_grids": patched[tasks[0]]["estimated"]}
    with r.phase(f"{name}/ablate"):
        circuits, out["circuits"] = choose_circuits(
            model.config, {t: patched[t]["grids"] for t in tasks}, a)
        if len(tasks) == 2:
            methods = a.methods.split(",")
            study = ablation_study(model, params, {t: (twins[t].clean, twins[t].clean_answer)
                                                   for t in tasks}, circuits,
                                   n_random=a.n_random, methods=methods, seed=seed)
            out["dissociation"] = dissociation(study, methods, tasks,
                                               n_boot=a.n_boot, seed=seed)
    out["logit_diff"] = {t: {"clean": patched[t]["m_clean"], "corrupt": patched[t]["m_corrupt"]}
                         for t in tasks}
    return out, {t: patched[t]["grids"] for t in tasks}


def analyse_trained(trained: kit.Trained, twins: dict, train_twins: dict, config, r: kit.Run,
                    family: str, seed: int) -> tuple[dict, dict]:
    """One trained model: its accuracies, then :func:`analyse`."""
    model, params = trained.model, trained.params
    out = {"training": trained.info}
    for key, tw, side in (("accuracy_test", twins, "clean"),
                          ("accuracy_train_items", train_twins, "clean"),
                          ("accuracy_corrupted_twins", twins, "corrupt")):
        out[key] = {t: lm.answer_accuracy(model, params, getattr(tw[t], side),
                                          getattr(tw[t], f"{side}_answer")) for t in TASKS}
    result, grids = analyse(model, params, twins, config, r, family, seed)
    return {**out, **result}, grids


@kit.job
def run(config, workdir) -> dict:
    """Train every family and seed, patch, pick circuits, ablate, write the run folder; with
    ``config.checkpoint`` set (``preset=paper``) analyse that real model instead
    (:func:`.paper.run_paper`)."""
    if config.get("checkpoint"):
        from mechinterp.experiments.recall_reasoning.paper import run_paper  # imports us
        return run_paper(config, workdir)
    with kit.Run(config, workdir) as r:
        families, seeds, a = lm.families(config.families), kit.train_seeds(config), config.analysis
        with r.phase("data"):
            mixture = make_mixture(config)
            builder = lm.build_data(mixture, config, r.workdir)
            twins = {t: make_twins(mixture, t, "test", a.n_items, config.seed) for t in TASKS}
            train_twins = {t: make_twins(mixture, t, "train", a.n_items, config.seed)
                           for t in TASKS}
        per_seed, arrays = {f: [] for f in families}, {}
        for family, seed in tqdm([(f, s) for f in families for s in seeds],
                                 desc="recall_reasoning", disable=not config.progress):
            with r.phase(f"{family}/train"):
                trained = lm.train_decoder(config, family, builder,
                                           mixture.tokenizer().vocab_size,
                                           r.workdir / "models" / family / f"seed{seed}",
                                           seed=seed)
            result, grids = analyse_trained(trained, twins, train_twins, config, r, family, seed)
            per_seed[family].append(result)
            for task in TASKS:
                arrays.update({f"{family}/seed{seed}/{task}/{g}": v
                               for g, v in grids[task].items()})
                if seed == seeds[0]:
                    plot_grids(r, f"patching_{family}_{task}.png", f"{family}, {task}: "
                               "normalized patching effect PE (clean -> corrupt)",
                               grids[task], twins[task].words)
        results = {"seeds": seeds, "per_seed": per_seed, "families": {
            f: kit.aggregate([{k: v for k, v in s.items() if k not in ("training", "circuits")}
                              for s in runs]) for f, runs in per_seed.items()}}
        with r.phase("report"):
            plot_dissociation(r, results["families"])
            r.write_results(results, arrays)
            r.write_report(report_markdown(config, results, twins, r.timings))
    return results


def plot_dissociation(r: kit.Run, families: dict):
    with r.figure("dissociation.png", 1, len(families), figsize=(6 * len(families), 3.5),
                  squeeze=False) as (fig, axes):
        for ax, (family, agg) in zip(axes[0], families.items()):
            rows, x = agg["dissociation"], np.arange(len(agg["dissociation"]))
            m = {k: [kit.mean_of(row[k]) for row in rows] for k in rows[0]
                 if k.endswith(("drop", "sd"))}
            ax.bar(x - 0.2, m["own_drop"], 0.4, label="own-task drop")
            ax.bar(x + 0.2, m["other_drop"], 0.4, label="other-task drop")
            ax.errorbar(x - 0.2, m["random_own_drop"], yerr=m["random_own_sd"], fmt="k_",
                        label="random (own)")
            ax.set_xticks(x, [f"{r['method']}\n{r['level']}\n{r['circuit']}" for r in rows],
                          fontsize=6)
            ax.set_title(f"{family}: accuracy drop when a circuit is ablated (seed mean)")
            ax.legend()

