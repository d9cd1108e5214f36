"""Projection heads in contrastive learning (Xue et al., 2024), small.

    mechinterp run configs/projection_head.py                 # default: 3 seeds
    mechinterp run configs/projection_head.py preset=smoke    # seconds; the CI smoke test

Trains a CNN encoder with InfoNCE without a head, with an MLP projection head and with a
fixed re-weighting head; measures feature weighting by depth and linear probes before and
after the head, on the training distribution and on shifted textures
(:mod:`mechinterp.experiments.projection_head`). Writes report.md, projection_head.png and
results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "heads": ("mlp",), "data.n_shapes": 2, "data.n_train": 8,
              "data.n_test": 4, "model.width": 4, "model.n_layers": 1, "train.steps": 3,
              "train.batch_size": 8},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.projection_head:run",
               workdir="runs/projection_head")
    c.seeds = 3
    c.heads = ("none", "mlp", "fixed")

    c.data = ml_collections.ConfigDict()
    c.data.n_shapes = 4  # classes of the probes: the first n shapes
    c.data.textures = ("solid", "hstripes")
    c.data.palette = "warm"
    c.data.shifted_textures = ("vstripes", "checker")
    c.data.shifted_palette = "warm"  # "cool" as well leaves every probe at chance (see docs)
    c.data.size = 8
    c.data.n_train = 100  # images per (shape, texture) class
    c.data.n_test = 50
    c.data.noise = 0.1

    c.model = ml_collections.ConfigDict()
    c.model.width = 32
    c.model.n_layers = 3
    c.model.kappa = 0.1  # fixed head: weight of the last feature (the first has 1)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400
    c.train.batch_size = 128
    c.train.learning_rate = 3e-3
    c.train.temperature = 0.5
    return kit.with_preset(c, PRESETS, arg)
