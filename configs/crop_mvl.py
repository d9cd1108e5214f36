"""Multi-view crop classification (Mena et al., 2024), small: the encoder x fusion grid.

    mechinterp run configs/crop_mvl.py                 # default: 25 cells x 3 budgets x 3 seeds
    mechinterp run configs/crop_mvl.py preset=smoke    # seconds; the CI smoke test

Trains every temporal encoder (LSTM, GRU, TempCNN, TAE, L-TAE) with every fusion (input,
feature, decision, ensemble, hybrid) on the synthetic optical / radar / weather crop task
at several label budgets (:mod:`mechinterp.experiments.crop_mvl`). Writes report.md,
grid.png and results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "encoders": ("tempcnn", "ltae"), "fusions": ("input", "hybrid"),
              "data.budgets": (2, 8), "data.pool": 300, "data.test": 200, "data.length": 8,
              "model.width": 8, "model.n_heads": 2, "train.steps": 20},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.crop_mvl:run", workdir="runs/crop_mvl")
    c.seeds = 3
    c.encoders = ("lstm", "gru", "tempcnn", "tae", "ltae")
    c.fusions = ("input", "feature", "decision", "ensemble", "hybrid")

    c.data = ml_collections.ConfigDict()
    c.data.budgets = (5, 20, 100)  # labelled fields per class
    c.data.pool = 2000  # fields the labelled subsets are drawn from
    c.data.test = 2000
    c.data.length = 24  # time steps in a season
    c.data.cloud = 0.3  # mean fraction of clouded optical steps

    c.model = ml_collections.ConfigDict()
    c.model.width = 32
    c.model.n_heads = 4

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.learning_rate = 3e-3
    return kit.with_preset(c, PRESETS, arg)
