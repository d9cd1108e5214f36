"""TARTE (pretrained table representations for reuse), small.

    mechinterp run configs/tarte.py                 # default: 3 seeds
    mechinterp run configs/tarte.py preset=smoke    # seconds; the CI smoke test

Pretrains a table transformer (:mod:`mechinterp.models.table`) contrastively on real
statsmodels tables (and, ``specialized``, the downstream tables' unlabeled rows), freezes
it and feeds its row embeddings to scikit-learn learners on iris, wine, breast cancer and
diabetes, against raw features and HistGradientBoosting
(:mod:`mechinterp.experiments.tarte`).
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "variants": ("general",), "data.downstream": ("iris", "diabetes"),
              "data.pretrain": ("grunfeld", "ccard", "statecrime"), "data.max_rows": 100,
              "model.d_model": 8, "model.n_layers": 1, "model.n_heads": 2, "model.d_mlp": 16,
              "train.steps": 5, "train.batch_size": 32, "folds": 3, "fast_compile": True},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.tarte:run", workdir="runs/tarte")
    c.seeds = 3
    c.variants = ("general", "specialized")
    c.folds = 5
    c.fast_compile = False  # XLA's unoptimized compile: faster for tiny runs

    c.data = ml_collections.ConfigDict()
    c.data.pretrain = ("star98", "fair", "grunfeld", "randhie", "ccard", "modechoice",
                       "statecrime", "anes96", "macrodata", "interest_inflation", "heart")
    c.data.downstream = ("iris", "wine", "breast_cancer", "diabetes")
    c.data.max_rows = 2000

    c.model = ml_collections.ConfigDict()
    c.model.n_cols = 30  # breast cancer's 30 features are the widest table
    c.model.d_name = 32
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.d_mlp = 64

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.temperature = 0.2
    c.train.drop = 0.3
    c.train.noise = 0.1
    return kit.with_preset(c, PRESETS, arg)
