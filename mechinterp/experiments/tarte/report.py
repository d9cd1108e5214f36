"""report.md and figures of the TARTE reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit

MARGIN = 0.005


def _mean(results, table, key) -> float:
    if key.startswith("raw/"):
        return results["raw"][table][key]
    return kit.mean_of(results["summary"][table][key])


def _fmt(results, table, key) -> str:
    """A raw-feature score (no seed dependence) or ``mean ± sd`` over pretraining seeds."""
    if key.startswith("raw/"):
        return f"{results['raw'][table][key]:.3f}"
    stat = results["summary"][table][key]
    return f"{kit.mean_of(stat):.3f} ± {stat['std']:.3f}" if kit.is_stat(stat) else \
        f"{stat:.3f}"


def _compare(results, ours: str, theirs: str, claim: str, note: str,
             strict: bool) -> kit.Claim | None:
    """Holds on a majority of tables: ``ours`` above ``theirs`` by more than MARGIN
    (``strict``: an improvement is claimed) or not below it by more than MARGIN."""
    tables = [t for t in results["raw"] if ours in results["summary"][t] or
              ours.startswith("raw/")]
    tables = [t for t in tables if theirs.startswith("raw/") or theirs in
              results["summary"][t]]
    if not tables:
        return None
    diffs = {t: _mean(results, t, ours) - _mean(results, t, theirs) for t in tables}
    wins = sum((d > MARGIN) if strict else (d > -MARGIN) for d in diffs.values())
    how = f"better by > {MARGIN}" if strict else f"at least as good (within {MARGIN})"
    return kit.Claim(claim, "; ".join(f"{t} {_fmt(results, t, ours)} vs "
                                      f"{_fmt(results, t, theirs)}" for t in tables),
                     wins * 2 > len(tables),
                     f"{ours} vs {theirs}: {how} on {wins} of "
                     f"{len(tables)} tables; {note}")


def claims(results: dict) -> list[kit.Claim]:
    rows = [
        ("general/linear", "raw/linear", "frozen TARTE embeddings make a simple learner as "
         "good as on the raw features", "needs a majority of tables", False),
        ("raw+general/linear", "raw/linear", "combined with other learners' inputs, TARTE "
         "embeddings improve prediction", "raw features plus embeddings", True),
        ("raw+general/linear", "raw/hgb", "TARTE-based models improve on strong baselines "
         "(gradient-boosted trees on raw features)", "linear learner on raw + embeddings",
         True),
        ("general/linear", "random/linear", "knowledge pretraining is what makes the "
         "representations useful", "against the same encoder untrained", True),
        ("specialized/linear", "general/linear", "specialized to a domain, TARTE gives "
         "representations that facilitate further learning", "pretrained also on the "
         "downstream rows (no targets)", True),
    ]
    return [c for row in rows if (c := _compare(results, *row)) is not None]


def figures(r, losses: dict) -> None:
    with r.figure("tarte.png", 1, 1, figsize=(5, 3.2)) as (_, ax):
        for variant, curves in losses.items():
            ax.plot(np.stack(curves).mean(0), label=variant, lw=1)
        ax.set(xlabel="step", ylabel="InfoNCE loss (seed mean)")
        ax.legend()


def markdown(config, results: dict, timings: dict) -> list[str]:
    m, n = config.model, len(kit.train_seeds(config))
    pre = results["tables"]["pretrain"]
    lines = [
        "# TARTE (pretrained table representations), small", "",
        f"Table transformer (d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads) "
        f"pretrained with InfoNCE for {config.train.steps} steps on {len(pre)} statsmodels "
        f"tables ({', '.join(f'{t[0]} {t[1]}x{t[2]}' for t in pre)}); `specialized` adds the "
        "downstream tables' rows without targets. Frozen readouts feed scikit-learn "
        f"learners; {config.folds}-fold CV accuracy (classification) or R^2 (diabetes). "
        f"{n} pretraining seeds (mean ± sd); raw-feature scores do not depend on them. "
        "Claims compare the first-named score with the second. Figure: tarte.png.",
        "", *kit.claims_table(claims(results)), ""]
    keys = sorted({k for t in results["summary"].values() for k in t})
    raw_keys = list(next(iter(results["raw"].values())))
    rows = [[t, *(f"{results['raw'][t][k]:.3f}" for k in raw_keys),
             *(kit.pm(results["summary"][t][k], ".3f") for k in keys)]
            for t in results["raw"]]
    lines += kit.table(["table", *raw_keys, *keys], rows) + [""]
    lines += [
        "What is simplified: column names are embedded by hashed character trigrams and "
        "words (`mechinterp.train.tables.name_embedding`), not a pretrained language model; "
        f"pretraining uses {len(pre)} small public tables, not a knowledge base; numbers are "
        "standardized per column and scale a name-dependent direction (CARTE's form); the "
        "contrastive views (cell dropout and value noise) are our reading of the paper's "
        "augmentations.", "",
        f"Timings: {kit.timings_line(timings)}."]
    return lines
