"""Moirai-MoE (Liu et al., 2024), small: centroid-gated sparse experts vs dense.

    mechinterp run configs/moirai_moe.py                 # default: 3 seeds
    mechinterp run configs/moirai_moe.py preset=smoke    # seconds; the CI smoke test

Trains a dense patch forecaster, clusters its tokens, trains the centroid-gated MoE at
equal active parameters, and compares both with seasonal naive, ARIMA and ETS; measures
expert usage by frequency regime and series type and ablates specialist experts
(:mod:`mechinterp.experiments.moirai_moe`). Writes report.md, expert_usage.png, results.json.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "train.fast_compile": True,
              "train.steps": 6, "train.batch_size": 16, "data.n_synthetic": 8,
              "data.n_test": 6, "data.n_test_real": 2, "data.real_repeat": 1,
              "data.real_series": ("nile", "sunspots"),
              "model.d_model": 8, "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 8,
              "model.n_experts": 4,
              "analysis.kmeans_windows": 16},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.moirai_moe:run", workdir="runs/moirai_moe")
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.patch = 4
    c.data.n_patches = 12          # context 48 steps, forecast the next 4
    c.data.n_synthetic = 400       # train series per synthetic kind
    c.data.n_test = 64             # test series per synthetic kind
    c.data.n_test_real = 24        # test windows per real series (evenly spaced)
    c.data.real_repeat = 2         # real train windows repeated in the corpus
    c.data.real_series = ("sunspots", "nile", "co2", "macrodata")

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.d_ff = 64              # MoE experts are d_ff // 2 wide: equal active params
    c.model.n_experts = 8

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1500
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.train.fast_compile = False   # True: XLA's unoptimised compile (smoke runs)

    c.analysis = ml_collections.ConfigDict()
    c.analysis.kmeans_windows = 512
    return kit.with_preset(c, PRESETS, arg)
