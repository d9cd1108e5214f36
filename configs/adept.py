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

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.num_train": 256, "data.num_test": 64, "model.d_model": 16,
              "model.n_layers": 2, "model.n_heads": 2, "model.d_mlp": 16,
              "pretrain.steps": 8, "pretrain.warmup_steps": 2, "tune.steps": 4,
              "tune.n_expand": 1, "tune.importance_every": 2, "tune.n_importance": 1,
              "tune.n_calib": 16, "tune.n_eval": 16},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.adept:run", workdir="runs/adept")
    # 3 seeds measured 343 s of CPU (46 min wall with the 2 cores shared, load 13-33)
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.general = {"recall": {}, "chain": {"n_symbols": 12, "length": 3}}
    c.data.domain = {"arith": {"n_terms": 3, "max_value": 9}}
    c.data.knowledge = {"n_entities": 24, "n_relations": 3}
    c.data.seq_len = 20
    c.data.num_train = 6000
    c.data.num_test = 600

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.d_mlp = 128

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 800
    c.pretrain.batch_size = 32
    c.pretrain.learning_rate = 1e-2
    c.pretrain.warmup_steps = 50
    c.pretrain.domain_share = 0.1  # fraction of pretraining rows from the domain task

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
