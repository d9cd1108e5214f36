"""Dopamine-style threshold-gain gates (form inferred) on digits, small scale.

    mechinterp run configs/dopamine.py                 # 3 seeds
    mechinterp run configs/dopamine.py preset=smoke    # seconds; the CI smoke test

An MLP pretrained on 50/50 upright and 45-degree-rotated digits is specialized to rotated
digits with frozen, bias-only, LoRA, per-neuron gates and full fine-tuning
(:mod:`mechinterp.experiments.dopamine`). Writes report.md and results.json.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "model.widths": (16, 16), "train.pretrain_steps": 20,
              "train.adapt_steps": 10},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.dopamine:run", workdir="runs/dopamine")
    # 3 seeds measured 27 s of CPU (4.5 min wall with the 2 cores shared)
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.angle = 45.0

    c.model = ml_collections.ConfigDict()
    c.model.widths = (128, 128)

    c.train = ml_collections.ConfigDict()
    c.train.pretrain_steps = 1500
    c.train.adapt_steps = 600
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3

    c.adapt = ml_collections.ConfigDict()
    c.adapt.learning_rate = 1e-2
    c.adapt.lora_rank = 4
    c.adapt.lora_alpha = 8.0
    c.adapt.temperature = 0.1
    return kit.with_preset(c, PRESETS, arg)
