"""DistillFSS (support-set knowledge distilled into a support-free student), small.

    mechinterp run configs/distillfss.py                 # default: 3 seeds
    mechinterp run configs/distillfss.py preset=smoke    # seconds; the CI smoke test

A support-conditioned teacher (:mod:`mechinterp.models.fewshot_seg`) trained episodically
on a synthetic source domain; per target domain (shifted shapes, medical-like blobs,
remote-sensing-like tiles: :mod:`mechinterp.train.fewshot_seg`), class and 1/5 shots: the
teacher, the distilled student, the fine-tuned student and a fine-tuned linear baseline;
mIoU and test-time cost (:mod:`mechinterp.experiments.distillfss`).
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "domains": ("medical",), "data.per_class": 8, "data.n_test": 4,
              "model.width": 8, "model.n_layers": 1, "model.hidden": 4, "model.n_keys": 4,
              "teacher.steps": 10, "teacher.batch_size": 4, "specialize.draws": 1,
              "specialize.n_aug": 4, "specialize.distill_steps": 4,
              "specialize.finetune_steps": 3, "specialize.baseline_steps": 4,
              "cost.queries": 4, "cost.repeats": 1, "fast_compile": True},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.distillfss:run", workdir="runs/distillfss")
    c.seeds = 3
    c.domains = ("shapes_shift", "medical", "remote")
    c.fast_compile = False  # XLA's unoptimized compile: faster for tiny runs

    c.data = ml_collections.ConfigDict()
    c.data.size = 32
    c.data.per_class = 60      # train pool per class (source: teacher episodes; targets: shots)
    c.data.n_test = 24         # test queries per class (= n_aug: one teacher compilation)

    c.model = ml_collections.ConfigDict()
    c.model.width = 16
    c.model.n_layers = 2
    c.model.pool = 2
    c.model.hidden = 16
    c.model.n_keys = 16

    c.teacher = ml_collections.ConfigDict()
    c.teacher.steps = 400
    c.teacher.batch_size = 8
    c.teacher.shots = 1
    c.teacher.learning_rate = 3e-3

    c.specialize = ml_collections.ConfigDict()
    c.specialize.shots = (1, 5)
    c.specialize.draws = 2
    c.specialize.n_aug = 24
    c.specialize.batch_size = 8
    c.specialize.learning_rate = 3e-3
    c.specialize.distill_steps = 100
    c.specialize.finetune_steps = 60
    c.specialize.finetune_scale = 0.3
    c.specialize.baseline_steps = 160   # = distill + fine-tune steps

    c.cost = ml_collections.ConfigDict()
    c.cost.queries = 24
    c.cost.repeats = 3
    return kit.with_preset(c, PRESETS, arg)
