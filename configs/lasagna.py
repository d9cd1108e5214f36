"""LASAGNA (Yang et al., 2026), small: background + RGBA foreground + composite generated
jointly by one DiT from a shape class and a location box.

    mechinterp run configs/lasagna.py                 # default: 3 DiT seeds
    mechinterp run configs/lasagna.py preset=smoke    # seconds; the CI smoke test

See :mod:`mechinterp.experiments.lasagna`. Writes report.md, samples.png, loss.png and
results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit
from mechinterp.experiments.layered import configs as layered

PRESETS = {
    "default": {},
    "smoke": {**layered.DIT_SMOKE, "data.n_train": 8},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.lasagna:run", workdir="runs/lasagna")
    c.seeds = 3

    layered.dit(c)  # data, model, train, eval: the shared DiT and its sampling
    return kit.with_preset(c, PRESETS, arg)
