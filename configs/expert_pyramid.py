"""Expert Pyramid Tuning (METHODS.md item 9, form inferred) on multi-task digits.

    mechinterp run configs/expert_pyramid.py                 # default: 3 seeds
    mechinterp run configs/expert_pyramid.py preset=smoke    # seconds; the CI smoke test

Pretrains an MLP on upright digits, then tunes it on four rotated/mirrored tasks at once:
full fine-tuning, a single LoRA, and the pyramid (multi-scale experts from one seed with a
task router), merged into the base weights per task
(:mod:`mechinterp.experiments.expert_pyramid`).
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "hidden": 16, "pretrain.steps": 20, "tune.steps": 20},
}


def _train(steps, batch_size, learning_rate):
    t = ml_collections.ConfigDict()
    t.steps, t.batch_size, t.learning_rate = steps, batch_size, learning_rate
    return t


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.expert_pyramid:run",
               workdir="runs/expert_pyramid")
    c.seeds = 3
    c.data = ml_collections.ConfigDict()
    c.data.test_fraction = 0.25
    c.hidden = 128
    c.pretrain = _train(1500, 64, 3e-3)
    c.tune = _train(1500, 64, 3e-3)
    c.adapter = ml_collections.ConfigDict()
    c.adapter.seed_rank = 2
    c.adapter.kernel_sizes = (1, 2, 3)  # expert ranks 2, 3, 4; the single LoRA: rank 9
    return kit.with_preset(c, PRESETS, arg)
