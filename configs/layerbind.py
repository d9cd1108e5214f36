"""LayerBind (Wang et al., 2025), small: training-free regional and occlusion control on a
joint-attention DiT, against the plain sampler, as a function of the fusion step.

    mechinterp run configs/layerbind.py                 # default: 3 DiT seeds
    mechinterp run configs/layerbind.py preset=smoke    # seconds; the CI smoke test

See :mod:`mechinterp.experiments.layerbind`. Writes report.md, samples.png,
fusion_step.png and results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.size": 8, "data.n_train": 16, "model.d_model": 8,
              "model.n_layers": 1, "model.n_heads": 1, "model.d_mlp": 8, "model.freq_dim": 8,
              "train.steps": 2, "train.batch_size": 4, "eval.n_samples": 3, "eval.n_steps": 2,
              "eval.fusion_steps": (0, 1, 2), "eval.fuse_main": 1, "eval.box_patches": 2,
              "eval.shift_patches": 1},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.layerbind:run", workdir="runs/layerbind")
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
    c.eval.fusion_steps = (0, 2, 4, 8, 16)  # 0: no instance initialization
    c.eval.fuse_main = 4
    c.eval.beta = 1.0  # layer transparency at the fusion step, decaying to 0
    c.eval.box_patches = 4
    c.eval.shift_patches = 2
    c.eval.colour_threshold = 0.35
    return kit.with_preset(c, PRESETS, arg)
