"""How transferable are features in deep neural networks? (Yosinski et al., 2014), small.

    mechinterp run configs/transfer_features.py                 # default: 3 seeds
    mechinterp run configs/transfer_features.py preset=smoke    # seconds; the CI smoke test

Splits classes into tasks A and B (digits 0-4 vs 5-9; procedural shapes at near and far
task distance), trains base CNNs, transfers the first n layers (AnB, BnB, frozen or
fine-tuned, and frozen random layers) and retrains on B, then mean-ablates each channel of a
network trained on both tasks to see where A- and B-specific features live
(:mod:`mechinterp.experiments.transfer_features`). Writes report.md, transfer.png,
specificity.png and results.json/npz to the workdir.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.splits": ("near",), "data.n_train": 16, "data.n_test": 8,
              "model.width": 4, "model.n_layers": 1, "train.steps": 4,
              "train.batch_size": 8},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.transfer_features:run",
               workdir="runs/transfer_features")
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.splits = ("digits", "near", "far")  # the first one decides the claims table
    c.data.size = 8  # shapes: image side, images per class, pixel noise
    c.data.n_train = 200
    c.data.n_test = 100
    c.data.noise = 0.1

    c.model = ml_collections.ConfigDict()
    c.model.width = 16
    c.model.n_layers = 3  # residual blocks after the stem: n = 1 .. n_layers + 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3

    c.analysis = ml_collections.ConfigDict()
    c.analysis.ablation = True
    c.analysis.chunk_size = 16
    return kit.with_preset(c, PRESETS, arg)
