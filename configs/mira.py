"""MIRA (2025), small: CT-RoPE vs index RoPE, ODE vs direct head, on irregular series.

    mechinterp run configs/mira.py                 # default: 3 seeds per variant
    mechinterp run configs/mira.py preset=smoke    # seconds; the CI smoke test

Trains MIRA-style forecasters (continuous-time RoPE, MoE with a sigmoid-gated shared
expert, neural-ODE head) on irregularly sampled synthetic and statsmodels series with
missing values (:mod:`mechinterp.experiments.mira`). Writes report.md, expert_usage.png
and results.json.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "train.fast_compile": True,
              "train.steps": 4, "train.batch_size": 8, "data.n_synthetic": 8,
              "data.n_test": 4, "data.n_test_real": 2, "data.real_repeat": 1,
              "data.real_series": ("nile",), "model.d_model": 8, "model.n_layers": 1,
              "model.n_heads": 2, "model.d_expert": 8, "model.ode_hidden": 8,
              "model.ode_steps": 2,
              # two of the three variants: each compiles its own training step
              "variants": {"CT-RoPE + ODE": ("continuous", "ode"),
                           "CT-RoPE + direct": ("continuous", "direct")}},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.mira:run", workdir="runs/mira")
    c.seeds = 3
    # name -> (rope, head) of mechinterp.models.forecaster.MiraForecaster
    c.variants = {"CT-RoPE + ODE": ("continuous", "ode"),
                  "index RoPE + ODE": ("index", "ode"),
                  "CT-RoPE + direct": ("continuous", "direct")}

    c.data = ml_collections.ConfigDict()
    c.data.context = 48            # dense steps of context ...
    c.data.n_context = 24          # ... of which this many are observed times
    c.data.horizon = 16            # targets within this many steps after the context
    c.data.beyond = 8              # 'beyond' test: targets this many steps further on
    c.data.n_target = 4
    c.data.missing = 0.1
    c.data.n_synthetic = 600       # train series per frequency regime
    c.data.n_test = 64
    c.data.n_test_real = 24
    c.data.real_repeat = 4         # irregular draws per real train window
    c.data.real_series = ("sunspots", "nile", "co2", "macrodata")

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_experts = 4
    c.model.d_expert = 32
    c.model.aux_loss_coef = 0.02
    c.model.ode_hidden = 64
    c.model.ode_steps = 8

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.train.fast_compile = False   # True: XLA's unoptimised compile (smoke runs)
    return kit.with_preset(c, PRESETS, arg)
