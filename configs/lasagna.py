"""LASAGNA (Yang et al., 2026), small: background + RGBA foreground + composite generated
jointly by one DiT from a shape class and a location box.

    mechinterp run configs/lasagna.py                 # default: 3 DiT seeds
    mechinterp run configs/lasagna.py preset=smoke    # seconds; the CI smoke test

See :mod:`mechinterp.experiments.lasagna`. Writes report.md, samples.png, loss.png and
results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.size": 8, "data.n_train": 8, "model.d_model": 8,
              "model.n_layers": 1, "model.n_heads": 1, "model.d_mlp": 8, "model.freq_dim": 8,
              "train.steps": 2, "train.batch_size": 4, "eval.n_samples": 3, "eval.n_steps": 2},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.lasagna:run", workdir="runs/lasagna")
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.size = 16
    c.data.n_train = 2048

    c.model = ml_collections.ConfigDict()
    c.model.patch_size = 2
    c.model.d_model = 48
    c.model.n_layers = 3
    c.model.n_heads = 3
    c.model.d_mlp = 96
    c.model.freq_dim = 32

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.batch_size = 32
    c.train.learning_rate = 1e-3

    c.eval = ml_collections.ConfigDict()
    c.eval.n_samples = 64
    c.eval.n_steps = 16
    return kit.with_preset(c, PRESETS, arg)
