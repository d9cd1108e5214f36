"""LayerDecomp (Yang et al., 2024), small: composite -> clean background + RGBA foreground
with its shadow and reflection, with vs without the recomposition-consistency loss.

    mechinterp run configs/layer_decomp.py                 # default: 3 seeds per condition
    mechinterp run configs/layer_decomp.py preset=smoke    # seconds; the CI smoke test

See :mod:`mechinterp.experiments.layer_decomp`. Writes report.md, samples.png, loss.png and
results.json/npz.
"""

import ml_collections

from mechinterp.experiments import kit
from mechinterp.experiments.layered import configs as layered

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.size": 8, "data.n_labelled": 8, "data.n_unlabelled": 8,
              "data.n_test": 4, "model.width": 4, "model.dilations": (1, 2),
              "train.steps": 3, "train.batch_size": 4},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.layer_decomp:run", workdir="runs/layer_decomp")
    c.seeds = 3
    c.consistency_weight = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.size = 16
    c.data.n_labelled = 128  # full layers, shadows only
    c.data.n_unlabelled = 256  # composite + background, shadows and reflections
    c.data.n_test = 128

    layered.conv(c)  # model, train: the dilated-convolution trunk and its training
    return kit.with_preset(c, PRESETS, arg)
