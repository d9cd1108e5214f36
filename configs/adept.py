"""ADEPT (adaptive expansion and decoupled tuning for continual pretraining), small scale.

    mechinterp run configs/adept.py                 # 3 seeds
    mechinterp run configs/adept.py preset=smoke    # seconds; the CI smoke test

Pretrains a LLaMA-style decoder on general synthetic tasks, then specializes it on a
domain task with full continual pretraining, LoRA, ADEPT's layer expansion alone and full
ADEPT (expansion + importance-decoupled unit learning rates); reports domain gain, general
forgetting, trainable fraction, time and where the domain knowledge landed
(:mod:`mechinterp.experiments.adept`). Writes report.md and results.json to the workdir.
"""

import ml_collections

from mechinterp.experiments import kit
from mechinterp.experiments.kit import domain

PRESETS = {
    "default": {},
    "smoke": {**domain.SMOKE, "tune.steps": 4, "tune.n_expand": 1, "tune.importance_every": 2,
              "tune.n_importance": 1, "tune.n_calib": 16, "tune.n_eval": 16},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.adept:run", workdir="runs/adept")
    # 3 seeds measured 343 s of CPU (46 min wall with the 2 cores shared, load 13-33)
    c.seeds = 3

    domain.base_config(c)  # data, model, pretrain: the shared pretrained base

    c.tune = ml_collections.ConfigDict()
    c.tune.steps = 300
    c.tune.batch_size = 32
    c.tune.learning_rate = 1e-3
    c.tune.lora_rank = 4
    c.tune.lora_alpha = 8.0
    c.tune.lora_learning_rate = 3e-3
    c.tune.n_expand = 1  # layers duplicated (ADEPT: the least important on general data)
    c.tune.importance_every = 50  # steps between unit-importance updates
    c.tune.n_importance = 4  # general batches per importance estimate
    c.tune.n_calib = 256  # general rows for stage-1 layer importance
    c.tune.n_eval = 256  # test rows for the ablation losses
    return kit.with_preset(c, PRESETS, arg)
