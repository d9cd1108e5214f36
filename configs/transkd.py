"""TransKD (Liu et al., 2023), small: SegFormer teacher -> student distillation variants.

    mechinterp run configs/transkd.py                 # default: 3 seeds (~11 CPU-minutes)
    mechinterp run configs/transkd.py preset=smoke    # seconds; the CI smoke test

Per seed a SegFormer-style teacher is trained on synthetic shape segmentation, then a
4x narrower, shallower student without KD and with feature-map KD, CSF, TransKD-Base
(CSF + PEA), + GL-Mixer and + EA (:mod:`mechinterp.experiments.transkd`). Writes
report.md (mIoU and FLOPs of every model) and results.json.
"""

import ml_collections

from mechinterp.experiments import kit

# smoke: one stage, two students (compiling the fits is most of its cost); EA runs CSF,
# PEA and EA (GL-Mixer: tests/test_segformer.py)
_TINY = {"dims": (8,), "depths": (1,), "heads": (2,), "d_decoder": 8}
PRESETS = {
    "default": {},
    "smoke": {"seeds": 2, "data.size": 16, "data.n_train": 32, "data.n_test": 16,
              "data.shapes": ("disk", "square"), "model.teacher": _TINY,
              "model.student": {**_TINY, "dims": (4,), "heads": (1,), "d_decoder": 4},
              "model.sr_ratios": (2,), "model.strides": (4,),
              "kd.methods": ("plain", "ea"), "train.steps": 4,
              "train.batch_size": 4, "eval_chunk": 16},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.transkd:run", workdir="runs/transkd")
    c.seeds = 3
    c.eval_chunk = 128  # images per compiled evaluation / teacher-target call

    c.data = ml_collections.ConfigDict()
    c.data.size = 32
    c.data.n_train = 512
    c.data.n_test = 256
    c.data.shapes = ("disk", "square", "triangle", "cross", "ring", "bar")
    c.data.n_objects = 3
    c.data.domain = "plain"

    c.model = ml_collections.ConfigDict()
    c.model.teacher = {"dims": (32, 64, 96, 128), "depths": (2, 2, 2, 2),
                       "heads": (2, 4, 6, 8), "d_decoder": 128}
    c.model.student = {"dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1),
                       "heads": (1, 2, 3, 4), "d_decoder": 32}
    c.model.sr_ratios = (2, 1, 1, 1)
    c.model.strides = (4, 2, 2, 2)

    c.kd = ml_collections.ConfigDict()
    c.kd.methods = ("plain", "feature", "csf", "base", "glmixer", "ea")
    c.kd.w_features = 1.0
    c.kd.w_embeds = 1.0
    c.kd.mid = 32  # CSF's fusion width

    c.train = ml_collections.ConfigDict()
    c.train.steps = 500
    c.train.batch_size = 16
    c.train.learning_rate = 2e-3
    return kit.with_preset(c, PRESETS, arg)
