"""SLAB (Guo et al., 2024), small: PRepBN and simplified linear attention in a ViT.

    mechinterp run configs/slab.py                 # default: 3 seeds
    mechinterp run configs/slab.py preset=smoke    # seconds; the CI smoke test

Trains ViTs on digits with LayerNorm, BatchNorm, RepBN and PRepBN, softmax or simplified
linear attention; times attention at growing token counts and folded-BatchNorm inference
(:mod:`mechinterp.experiments.slab`). Writes report.md, slab.png and results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "variants": {"PRepBN": ("prepbn", "linear")},
              "model.d_model": 8, "model.n_layers": 1, "model.n_heads": 2, "model.d_mlp": 8,
              "train.steps": 4, "train.batch_size": 8, "latency.grids": (2, 4),
              "latency.repeats": 1, "latency.batch": 8},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.slab:run", workdir="runs/slab")
    c.seeds = 3
    # name -> (norm, attention) of mechinterp.models.vit.ViT
    c.variants = {"LN": ("layer", "softmax"), "BN": ("batch", "softmax"),
                  "RepBN": ("repbn", "softmax"), "PRepBN": ("prepbn", "softmax"),
                  "LN+SLA": ("layer", "linear"), "PRepBN+SLA": ("prepbn", "linear")}

    c.model = ml_collections.ConfigDict()
    c.model.patch_size = 2
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.d_mlp = 64

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.learning_rate = 2e-3

    c.latency = ml_collections.ConfigDict()
    c.latency.grids = (8, 16, 32, 48)  # tokens = grid ** 2
    c.latency.d_model = 64
    c.latency.n_heads = 4
    c.latency.repeats = 5
    c.latency.batch = 256
    return kit.with_preset(c, PRESETS, arg)
