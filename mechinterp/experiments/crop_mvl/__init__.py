"""Multi-view crop classification (Mena et al., 2024), small: the encoder x fusion grid.

Every pair of a temporal encoder (:mod:`mechinterp.models.temporal`: LSTM, GRU, TempCNN,
TAE, L-TAE) and a fusion strategy (:mod:`mechinterp.models.fusion`: input, feature,
decision, ensemble, hybrid) is trained on the synthetic optical / radar / weather crop
task (:mod:`mechinterp.train.crop_views`) at several label budgets (labelled fields per
class) over training seeds, and scored on one held-out test set (accuracy, macro F1).
One compiled call per grid cell trains every budget and seed (``training.fit_runs``).
The question is the paper's: does one pair win at every budget, or does the best pair
(and the best encoder for a given fusion) change?
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

from mechinterp.experiments import kit
from mechinterp.experiments.crop_mvl import report
from mechinterp.experiments.crop_mvl.training import fit_runs, predict_runs
from mechinterp.models.fusion import make_fusion
from mechinterp.train.crop_views import (CLASSES, CropViews, label_budget, model_inputs,
                                         standardize)


def make_data(config) -> dict:
    """Standardized model inputs of the labelled pool (per budget, padded) and test set."""
    d = config.data
    pool = CropViews(d.pool, seed=config.seed, length=d.length, cloud=d.cloud)
    test = CropViews(d.test, seed=config.seed + 1, length=d.length, cloud=d.cloud)
    pool_arrays, test_arrays = standardize(pool.arrays, test.arrays)
    pool_views, test_views = model_inputs(pool_arrays), model_inputs(test_arrays)
    size = max(d.budgets) * len(CLASSES)
    per_budget = []
    for budget in d.budgets:
        idx = label_budget(pool.labels, budget, config.seed)
        idx = np.concatenate([idx, np.zeros(size - len(idx), int)])  # padding, never drawn
        per_budget.append(([v[idx] for v in pool_views], pool.labels[idx],
                           budget * len(CLASSES)))
    return {"budgets": per_budget, "test_views": test_views, "test_labels": test.labels}


def train_cell(config, fusion: str, encoder: str, data: dict) -> dict:
    """``{budget: [per-seed scores]}`` of one grid cell (every budget and seed at once)."""
    seeds = kit.train_seeds(config)
    runs = [(b, s) for b in range(len(config.data.budgets)) for s in seeds]
    n_views = len(data["test_views"])
    views = [np.stack([data["budgets"][b][0][v] for b, _ in runs]) for v in range(n_views)]
    labels = np.stack([data["budgets"][b][1] for b, _ in runs])
    counts = [data["budgets"][b][2] for b, _ in runs]
    m = config.model
    model = make_fusion(fusion, encoder, len(CLASSES), width=m.width, n_heads=m.n_heads)
    t = config.train
    params, losses = fit_runs(model, views, labels, counts, [s for _, s in runs],
                              steps=t.steps, batch_size=t.batch_size,
                              learning_rate=t.learning_rate)
    pred = predict_runs(model, params, data["test_views"])
    y = data["test_labels"]
    losses = np.asarray(losses)
    out = {}
    for r, (b, _) in enumerate(runs):
        out.setdefault(str(config.data.budgets[b]), []).append({
            "accuracy": float(np.mean(pred[r] == y)),
            "macro_f1": float(f1_score(y, pred[r], average="macro")),
            "final_loss": float(losses[r, -max(1, t.steps // 10):].mean())})
    return out


def winners(config, cells: dict, metric: str) -> dict:
    """Per budget: the best pair by seed-mean ``metric``, the pairs within one seed-sd of
    it (ties), the best encoder per fusion and the best pair on each seed."""
    out = {}
    for budget in map(str, config.data.budgets):
        mean = {c: float(np.mean([s[metric] for s in v[budget]])) for c, v in cells.items()}
        best = max(mean, key=mean.get)
        sd = float(np.std([s[metric] for s in cells[best][budget]], ddof=1)) \
            if len(cells[best][budget]) > 1 else 0.0
        per_seed = [max(cells, key=lambda c, i=i: cells[c][budget][i][metric])
                    for i in range(len(cells[best][budget]))]
        by_fusion = {f: max(config.encoders, key=lambda e, f=f: mean[f"{f}/{e}"])
                     for f in config.fusions}
        out[budget] = {"best": best, "best_mean": mean[best], "best_sd": sd,
                       "ties": sorted(c for c, x in mean.items() if x >= mean[best] - sd),
                       "best_per_seed": per_seed, "best_encoder_by_fusion": by_fusion}
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = make_data(config)
        cells = {}
        for fusion in config.fusions:
            with r.phase(f"train/{fusion}"):
                for encoder in config.encoders:
                    cells[f"{fusion}/{encoder}"] = train_cell(config, fusion, encoder, data)
        results = {"cells": {c: {b: {"per_seed": v, "summary": kit.aggregate(v)}
                                 for b, v in per_budget.items()}
                             for c, per_budget in cells.items()},
                   "winners": {m: winners(config, cells, m) for m in ("accuracy", "macro_f1")}}
        grid = np.array([[[np.mean([s["accuracy"] for s in cells[f"{f}/{e}"][str(b)]])
                           for e in config.encoders] for f in config.fusions]
                         for b in config.data.budgets])
        with r.phase("report"):
            report.figure(r, config, grid)
            r.write_results(results, {"accuracy_grid": grid})
            r.write_report(report.markdown(config, results, r.timings))
