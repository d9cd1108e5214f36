"""Workflow-aware structured layer decomposition (illustration production), small:
recover flat colour, shadow, highlight and line-art layers and their order, with layer
semantic embeddings vs one shared head.

    mechinterp run configs/workflow_layers.py                 # default: 3 seeds per variant
    mechinterp run configs/workflow_layers.py preset=smoke    # seconds; the CI smoke test

See :mod:`mechinterp.experiments.workflow_layers`. Writes report.md, samples.png and
results.json.
"""

import ml_collections

from mechinterp.experiments import kit
from mechinterp.experiments.layered import configs as layered

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.size": 8, "data.n_train": 8, "data.n_test": 4,
              "model.width": 4, "model.dilations": (1,), "train.steps": 2,
              "train.batch_size": 4},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.workflow_layers:run",
               workdir="runs/workflow_layers")
    c.seeds = 3
    c.variants = ("embeddings", "single_head")

    c.data = ml_collections.ConfigDict()
    c.data.size = 16
    c.data.n_train = 256
    c.data.n_test = 128

    layered.conv(c)  # model, train: the dilated-convolution trunk and its training
    return kit.with_preset(c, PRESETS, arg)
