"""Neuron partitions ("bricks") at small scale (METHODS.md item 5); config and presets in
``configs/bricks.py``.

Per training seed: train (or reuse) a LLaMA-style decoder on four task-marked synthetic
tasks; measure MLP neuron activity per task and k-means partitions of the neurons'
co-activation profiles; zero each partition and measure each task's exact match against
random neuron sets of the same size. Expected: a diagonal-dominant task x partition
matrix (a partition hurts its home task most). Procedure and outputs: docs/experiments.md.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mechinterp import bricks
from mechinterp.experiments import kit
from mechinterp.experiments.kit import lm
from mechinterp.train.losses import next_token_terms


def exact_match(data: lm.Examples):
    """Share of ``data``'s sequences whose every target token is predicted (a metric on
    full logits, for :func:`~mechinterp.bricks.partition_ablation`)."""
    batch = {"tokens": jnp.asarray(data.tokens), "loss_mask": jnp.asarray(data.loss_mask)}

    def metric(logits):
        terms = next_token_terms(logits, batch)
        return terms["exact"] / terms["sequences"]
    return metric


@kit.job
def run(config, workdir) -> dict:
    """Train every seed, measure frequencies, partition, ablate, write the run folder."""
    with kit.Run(config, workdir) as r:
        a = config.analysis
        with r.phase("data"):
            mixture, builder = lm.make_data(config, r.workdir)
            calib = lm.examples(mixture, "train", a.n_calibration)
            data = lm.examples(mixture, "test", a.n_eval)
        per_seed = []
        for seed in kit.train_seeds(config):
            with r.phase("train"):
                trained = lm.train_decoder(config, "llama", builder,
                                           mixture.tokenizer().vocab_size,
                                           r.workdir / "models" / "llama" / f"seed{seed}",
                                           seed=seed)
            with r.phase("analysis"):
                per_seed.append(analyse(trained, calib, data, config))
        results = {"seeds": kit.train_seeds(config), "per_seed": per_seed,
                   "summary": kit.aggregate([headline(x) for x in per_seed])}
        with r.phase("report"):
            first = per_seed[0]
            plot_frequencies(r, first)
            plot_ablation(r, first)
            r.write_results(results)
            r.write_report(report(config, results, r.timings))
    return results


def analyse(trained: kit.Trained, calib: lm.Examples, data: lm.Examples, config) -> dict:
    """Frequencies, specialization, partitions and the partition ablation of one model."""
    model, params, a = trained.model, trained.params, config.analysis
    seed = trained.info["seed"]  # each trained model gets its own partition and controls
    tasks = [t for i, t in enumerate(data.task_names) if (calib.task == i).any()
             and (data.task == i).any()]
    index = {t: data.task_names.index(t) for t in tasks}
    acts = {t: bricks.neuron_activations(model, params, calib.of_task(index[t]).tokens,
                                         calib.of_task(index[t]).real) for t in tasks}
    tau = bricks.thresholds(acts, a.quantile)
    freq = bricks.frequencies(acts, tau)
    spec = bricks.specialization(freq)
    active = np.concatenate([(x > tau[None, :, None]).reshape(len(x), -1)
                             for x in acts.values()])
    labels = bricks.coactivation_partitions(active, a.n_partitions, seed=seed)
    per_task = {t: data.of_task(index[t]) for t in tasks}
    study = bricks.partition_ablation(
        model, params, {t: per_task[t].tokens for t in tasks},
        {t: exact_match(per_task[t]) for t in tasks}, labels, model.config.d_mlp,
        n_random=a.n_random, seed=seed)
    home = np.array([int(np.argmax(spec[:, labels == p].mean(1)))
                     for p in range(len(study["sizes"]))])
    return {"training": trained.info, "tasks": tasks, "thresholds": tau, "frequencies": freq,
            "specialization": spec, "labels": labels, "home_task": [tasks[h] for h in home],
            "metrics": lm.lm_metrics(model, params, data), **study,
            "n_layers": model.config.n_layers, "d_mlp": model.config.d_mlp,
            "selectivity": selectivity(study["drop"], home),
            "random_selectivity": np.stack([selectivity(study["random_drop"][..., r], home)
                                            for r in range(a.n_random)], -1)}


def selectivity(drop: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Per partition: drop on its home task minus the mean drop on the other tasks."""
    n_tasks = drop.shape[0]
    own = drop[home, np.arange(drop.shape[1])]
    return own - (drop.sum(0) - own) / max(n_tasks - 1, 1)


def headline(res: dict) -> dict:
    """One seed's headline numbers (aggregated over seeds by :func:`kit.aggregate`)."""
    tasks = res["tasks"]
    drop, rdrop = np.asarray(res["drop"]), np.asarray(res["random_drop"])
    home = [tasks.index(t) for t in res["home_task"]]
    parts = range(len(home))
    return {
        "base": dict(zip(tasks, map(float, res["base"]))),
        "n_partitions": len(home),
        "diagonal": sum(int(np.argmax(drop[:, p]) == home[p]) for p in parts),
        "beats_random": sum(int(drop[home[p], p] > rdrop[home[p], p].mean()
                                + rdrop[home[p], p].std()) for p in parts),
        "selectivity": float(np.mean(res["selectivity"])),
        "random_selectivity": float(np.mean(res["random_selectivity"])),
        "home_tasks_covered": len(set(home)),
    }


def plot_frequencies(r: kit.Run, res: dict) -> None:
    freq, spec, labels, tasks = (np.asarray(res[k]) for k in ("frequencies", "specialization",
                                                              "labels", "tasks"))
    with r.figure("frequencies.png", 1, 2, figsize=(11, 3.4),
                  gridspec_kw={"width_ratios": [3, 1]}) as (fig, axes):
        order = np.argsort(labels, kind="stable")
        im = axes[0].imshow(freq[:, order], aspect="auto", cmap="viridis",
                            interpolation="nearest")
        for b in np.flatnonzero(np.diff(labels[order])) + 0.5:
            axes[0].axvline(b, color="white", lw=0.8)
        axes[0].set_yticks(range(len(tasks)), list(tasks))
        axes[0].set_xlabel("neuron (grouped by partition)")
        axes[0].set_title(f"activation frequency per task (seed {res['training']['seed']})")
        fig.colorbar(im, ax=axes[0], fraction=0.03)
        axes[1].hist(spec.max(0), bins=30)
        axes[1].set_xlabel("max over tasks of specialization")
        axes[1].set_ylabel("neurons")


def plot_ablation(r: kit.Run, res: dict) -> None:
    tasks = res["tasks"]
    home = [tasks.index(t) for t in res["home_task"]]
    columns = np.argsort(home, kind="stable")
    drop, random_mean = np.asarray(res["drop"]), np.asarray(res["random_drop"]).mean(-1)
    lim = max(1e-6, float(np.abs(drop).max()), float(np.abs(random_mean).max()))
    with r.figure("ablation.png", 1, 2, figsize=(11, 3.6)) as (fig, axes):
        for ax, matrix, title in ((axes[0], drop, "partition zeroed"),
                                  (axes[1], random_mean, "random set of equal size (mean)")):
            im = ax.imshow(matrix[:, columns], cmap="RdBu_r", vmin=-lim, vmax=lim,
                           aspect="auto", interpolation="nearest")
            ax.set_yticks(range(len(tasks)), tasks)
            ax.set_xticks(range(len(columns)),
                          [f"P{p}\n{tasks[home[p]]}" for p in columns], fontsize=6)
            ax.set_title(f"accuracy drop: {title}")
            fig.colorbar(im, ax=ax, fraction=0.046)


def report(config, results: dict, timings: dict) -> str:
    res, s, a = results["per_seed"][0], results["summary"], config.analysis
    tasks, sizes, spec = res["tasks"], res["sizes"], np.asarray(res["specialization"])
    drop, rdrop = np.asarray(res["drop"]), np.asarray(res["random_drop"])
    home = [tasks.index(t) for t in res["home_task"]]
    n, seeds = len(home), results["seeds"]
    lines = ["# Neuron partitions (bricks) at small scale (METHODS.md item 5)", "",
             (f"Preset `{config.preset}`, training seeds {seeds}; a {res['n_layers']}-layer "
              f"decoder ({res['n_layers']} x {res['d_mlp']} MLP neurons) trained "
              f"{res['training']['step']} steps on {', '.join(tasks)} per seed. Frequencies "
              f"on {a.n_calibration} training prompts (active: |mlp.hidden| above the "
              f"layer's {a.quantile:.0%} quantile), ablation on {a.n_eval} test examples "
              "(exact match, teacher-forced). The method's details are inferred (see "
              "`mechinterp.bricks`). Numbers are mean ± sd over seeds where marked; the "
              f"tables below are seed {seeds[0]}'s."), "",
             "Unablated exact match: " + ", ".join(
                 f"{t} {kit.pm(s['base'][t], '.3f')}" for t in tasks) + ".", "",
             "## Against the expectation", "",
             *kit.claims_table([
                 kit.Claim("a partition hurts its home task most (diagonal-dominant task x "
                           "partition matrix)",
                           f"{kit.pm(s['diagonal'], '.1f')} of {n} partitions (chance about "
                           f"{n / len(tasks):.1f})",
                           kit.mean_of(s["diagonal"]) > 1.5 * n / len(tasks),
                           "more than 1.5x chance"),
                 kit.Claim("ablating a partition hurts its own task more than other tasks",
                           f"mean selectivity {kit.pm(s['selectivity'], '+.3f')} vs "
                           f"{kit.pm(s['random_selectivity'], '+.3f')} for random sets",
                           kit.mean_of(s["selectivity"]) > kit.mean_of(s["random_selectivity"])
                           + 0.05, "by more than 0.05"),
                 kit.Claim("partitions are functional (beyond neuron count)",
                           f"{kit.pm(s['beats_random'], '.1f')} of {n} partitions cut their "
                           "home task more than random sets of equal size (mean + 1 sd)",
                           kit.mean_of(s["beats_random"]) >= n / 2, "at least half")]), "",
             *verdicts(res), "",
             "## Frequencies and specialization", "", "![frequencies](frequencies.png)", "",
             *kit.table(["task", "neurons with specialization > 0.2", "> 0.4",
                         "mean frequency"],
                        [(name, (spec[t] > 0.2).sum(), (spec[t] > 0.4).sum(),
                          f"{np.mean(res['frequencies'][t]):.3f}")
                         for t, name in enumerate(tasks)]), "",
             "## Partition ablation (task x partition accuracy drop)", "",
             "![ablation](ablation.png)", "",
             *kit.table(["partition", "size", "home task",
                         *[f"drop {t} (random ± sd)" for t in tasks], "selectivity (random)"],
                        [(f"P{p}", sizes[p], tasks[home[p]],
                          *[f"{drop[t, p]:+.3f} ({rdrop[t, p].mean():+.3f} ± "
                            f"{rdrop[t, p].std():.3f})" for t in range(len(tasks))],
                          f"{res['selectivity'][p]:+.3f} "
                          f"({np.mean(res['random_selectivity'][p]):+.3f})")
                         for p in range(len(sizes))]), "",
             ("Caveats: small models, synthetic tasks marked by a task token (neurons reading "
              "that token are task-specific by construction); the survey describes bricks "
              "qualitatively, so the thresholds, specialization score, clustering and the "
              "verdict thresholds here are our choices."), "",
             f"Timings: {kit.timings_line(timings)}.", ""]
    return "\n".join(lines)


def verdicts(res: dict) -> list[str]:
    tasks = res["tasks"]
    home = [tasks.index(t) for t in res["home_task"]]
    h = headline(res)
    covered = sorted({tasks[i] for i in home})
    weak = [f"{t} ({b:.2f})" for t, b in zip(tasks, res["base"]) if b < 0.5]
    floor = ([(f"- Tasks the model solves less than half the time leave little room for a drop: "
              f"{', '.join(weak)}.")] if weak else [])
    return floor + [
        (f"- Seed {res['training']['seed']}: diagonal dominance {h['diagonal']} of "
         f"{h['n_partitions']}; {h['beats_random']} partitions beat random sets; mean "
         f"selectivity {h['selectivity']:+.3f} vs {h['random_selectivity']:+.3f} random."),
        f"- Home tasks covered by some partition: {', '.join(covered)} of {', '.join(tasks)}.",
    ]
