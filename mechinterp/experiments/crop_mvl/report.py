"""report.md and the figure of the multi-view crop reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit


def _short(pair: str) -> str:
    fusion, encoder = pair.split("/")
    return f"{encoder} + {fusion}"


def claims(config, results: dict) -> list[kit.Claim]:
    w = results["winners"]["accuracy"]
    budgets = list(w)
    best = {b: w[b]["best"] for b in budgets}
    always_tied = set.intersection(*(set(w[b]["ties"]) for b in budgets))
    seed_winners = {p for b in budgets for p in w[b]["best_per_seed"]}
    per_budget = "; ".join(f"{b}/class: {_short(best[b])} ({w[b]['best_mean']:.3f})"
                           for b in budgets)
    out = [kit.Claim(
        "with limited labels no single encoder x fusion pair is best everywhere",
        f"best pair by seed-mean accuracy: {per_budget}; {len(set(best.values()))} distinct "
        f"winners over {len(budgets)} budgets, {len(seed_winners)} over single seeds; pairs "
        f"within one seed-sd of the best at every budget: "
        f"{', '.join(map(_short, sorted(always_tied))) or 'none'}",
        len(set(best.values())) > 1 and not always_tied,
        "yes = the winner changes with the budget and no pair ties the best (within one "
        "sd) at every budget")]
    n_best_enc = {b: len(set(w[b]["best_encoder_by_fusion"].values())) for b in budgets}
    out.append(kit.Claim(
        "the best encoder depends on the fusion strategy (pick the encoder per fusion)",
        "distinct best encoders over the fusions: "
        + ", ".join(f"{n} at {b}/class" for b, n in n_best_enc.items()),
        any(n > 1 for n in n_best_enc.values()), "yes = more than one at some budget"))
    return out


def figure(r, config, grid: np.ndarray) -> None:
    n = len(config.data.budgets)
    with r.figure("grid.png", 1, n, figsize=(3.2 * n, 2.8), squeeze=False) as (fig, axes):
        for ax, budget, acc in zip(axes[0], config.data.budgets, grid):
            im = ax.imshow(acc, cmap="viridis")
            ax.set(xticks=range(len(config.encoders)), xticklabels=config.encoders,
                   yticks=range(len(config.fusions)), yticklabels=config.fusions,
                   title=f"{budget} labels / class")
            i, j = np.unravel_index(acc.argmax(), acc.shape)
            ax.text(j, i, "*", ha="center", va="center", color="red", fontsize=14)
            fig.colorbar(im, ax=ax, shrink=0.8)


def markdown(config, results: dict, timings: dict) -> list[str]:
    d, m, t = config.data, config.model, config.train
    seeds = len(kit.train_seeds(config))
    lines = [
        "# Multi-view crop classification (Mena et al., 2024), small", "",
        f"Synthetic crop-type task ({d.length} time steps, 6 classes; optical view with "
        f"~{d.cloud:.0%} clouded steps as missing values, radar, weather), {d.pool} fields to "
        f"label from, {d.test} test fields. Every encoder x fusion pair (width {m.width}, "
        f"{m.n_heads} heads) trained with {t.steps} Adam steps (batch {t.batch_size}, lr "
        f"{t.learning_rate}) on {', '.join(map(str, d.budgets))} labelled fields per class, "
        f"{seeds} training seeds (the labelled subset is fixed per budget). Test accuracy "
        "and macro F1, mean ± sd over seeds. Figure: grid.png.", "",
        *kit.claims_table(claims(config, results)), ""]
    for metric in ("accuracy", "macro_f1"):
        w = results["winners"][metric]
        lines += [f"## Who wins where ({metric})", ""]
        lines += kit.table(
            ["labels / class", "best pair", "within one sd of the best", "best per seed",
             "best encoder per fusion"],
            [[b, f"{_short(x['best'])} ({x['best_mean']:.3f} ± {x['best_sd']:.3f})",
              ", ".join(map(_short, x["ties"])), ", ".join(map(_short, x["best_per_seed"])),
              ", ".join(f"{f}: {e}" for f, e in x["best_encoder_by_fusion"].items())]
             for b, x in w.items()]) + [""]
    for budget in map(str, d.budgets):
        best = results["winners"]["accuracy"][budget]["best"]
        lines += [f"## Test accuracy, {budget} labelled fields per class", ""]
        rows = []
        for f in config.fusions:
            cells = [kit.pm(results["cells"][f"{f}/{e}"][budget]["summary"]["accuracy"], ".3f")
                     for e in config.encoders]
            rows.append([f, *[f"**{c}**" if f"{f}/{e}" == best else c
                              for e, c in zip(config.encoders, cells)]])
        lines += kit.table(["fusion \\ encoder", *config.encoders], rows) + [""]
    lines += [
        "## What is synthetic, simplified or inferred", "",
        "- Synthetic: the data replace CropHarvest (no download here); classes are built so "
        "that different views separate different pairs (rice needs radar, sorghum leans on "
        "weather, maize/soy on optical timing). The static topography view is left out.",
        "- Simplified: TempCNN without BatchNorm and dropout; TAE/L-TAE attend over every "
        "step (missing optical steps are zeros plus an observed-mask channel, not masked); "
        "small widths and few steps so the 25-cell grid runs on 2 CPU cores.",
        "- Inferred: decision fusion trains per-view heads jointly through the averaged "
        "probability; ensemble trains each view's model on its own loss and averages "
        "probabilities; hybrid adds per-view auxiliary heads to feature fusion (loss fused + "
        "mean auxiliary) and averages all heads. 'Wins' is the seed-mean test accuracy; "
        "'within one sd' uses the best pair's seed sd.", "",
        f"Timings: {kit.timings_line(timings)}."]
    return lines
