"""CoFiTune (coarse-to-fine fine-tuning for speciality vs versatility), small scale.

    mechinterp run configs/cofitune.py                 # 3 seeds
    mechinterp run configs/cofitune.py preset=smoke    # seconds; the CI smoke test

Pretrains a decoder on general synthetic tasks (as configs/adept.py), then fine-tunes it
on a domain task: a coarse grid over (layer range x module type), fine soft-masking of
gradients by head / neuron importance, and full fine-tuning
(:mod:`mechinterp.experiments.cofitune`). Writes report.md and results.json.
"""

import ml_collections

from mechinterp.experiments import kit
from mechinterp.experiments.kit import domain

PRESETS = {
    "default": {},
    "smoke": {**domain.SMOKE, "tune.steps": 4, "tune.n_importance": 1, "tune.n_eval": 16,
              "coarse.n_val": 16, "coarse.layer_ranges": ((0, 1), (0, 2)),
              "coarse.modules": ("mlp",)},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.cofitune:run", workdir="runs/cofitune")
    # 3 seeds measured 482 s of CPU (49 min wall with the 2 cores shared, load 13-33)
    c.seeds = 3

    domain.base_config(c)  # data, model, pretrain: the shared pretrained base

    c.coarse = ml_collections.ConfigDict()
    c.coarse.layer_ranges = ((0, 2), (2, 4), (0, 4))  # [start, stop) layer ranges
    c.coarse.modules = ("attn", "mlp", "both")
    c.coarse.n_val = 200  # train rows per side held out to pick the coarse pair

    c.tune = ml_collections.ConfigDict()
    c.tune.steps = 300
    c.tune.batch_size = 32
    c.tune.learning_rate = 1e-3
    c.tune.dropout = 0.1  # unit dropout of the two self-KL passes
    c.tune.n_importance = 4  # general batches for the fine importance
    c.tune.n_eval = 256
    return kit.with_preset(c, PRESETS, arg)
