"""LayerBind (Wang et al., 2025), small: training-free regional and occlusion control on a
joint-attention DiT, against the plain sampler, as a function of the fusion step.

    mechinterp run configs/layerbind.py                 # default: 3 DiT seeds
    mechinterp run configs/layerbind.py preset=smoke    # seconds; the CI smoke test

See :mod:`mechinterp.experiments.layerbind`. Writes report.md, samples.png,
fusion_step.png and results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit
from mechinterp.experiments.layered import configs as layered

PRESETS = {
    "default": {},
    "smoke": {**layered.DIT_SMOKE, "data.n_train": 16, "eval.fusion_steps": (0, 1, 2),
              "eval.fuse_main": 1, "eval.box_patches": 2, "eval.shift_patches": 1},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.layerbind:run", workdir="runs/layerbind")
    c.seeds = 3

    layered.dit(c)  # data, model, train, eval: the shared DiT and its sampling
    c.eval.fusion_steps = (0, 2, 4, 8, 16)  # 0: no instance initialization
    c.eval.fuse_main = 4
    c.eval.beta = 1.0  # layer transparency at the fusion step, decaying to 0
    c.eval.box_patches = 4
    c.eval.shift_patches = 2
    c.eval.colour_threshold = 0.35
    return kit.with_preset(c, PRESETS, arg)
