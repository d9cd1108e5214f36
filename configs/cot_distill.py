"""Specializing smaller LMs by chain-of-thought distillation (METHODS.md item 11).

    mechinterp run configs/cot_distill.py                 # default: 3 seeds
    mechinterp run configs/cot_distill.py preset=smoke    # seconds; the CI smoke test

A program writes multi-step arithmetic solutions; a larger decoder trained on its CoT text
is the teacher; per seed a small base student learns generic tasks (recall, in-context
chains) and is specialized three ways (answer-only, CoT, CoT + per-token KL to the
teacher); report.md compares final-answer accuracy and the generic tasks' exact match
(see :mod:`mechinterp.experiments.cot_distill`).
"""

import ml_collections

from mechinterp.experiments import kit


def _model(d_model, n_layers, n_heads, d_mlp):
    m = ml_collections.ConfigDict()
    m.d_model, m.n_layers, m.n_heads, m.d_mlp = d_model, n_layers, n_heads, d_mlp
    return m


def _train(steps, batch_size, learning_rate, warmup_steps):
    t = ml_collections.ConfigDict()
    t.steps, t.batch_size, t.learning_rate, t.warmup_steps = (steps, batch_size, learning_rate,
                                                              warmup_steps)
    return t


def _stage(model, train):
    s = ml_collections.ConfigDict()
    if model is not None:
        s.model = model
    s.train = train
    return s


TINY = {f"{stage}.model.{k}": v for stage in ("teacher", "base")
        for k, v in {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_mlp": 32}.items()}

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.num_train": 256, "data.num_generic_train": 256,
              "data.num_test": 32, **TINY, "teacher.train.steps": 8, "base.train.steps": 8,
              "student.train.steps": 8, "teacher.train.warmup_steps": 1,
              "base.train.warmup_steps": 1, "student.train.warmup_steps": 1},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.cot_distill:run", workdir="runs/cot_distill")
    c.seeds = 3  # base + three specialized students per training seed

    c.data = ml_collections.ConfigDict()
    c.data.n_terms = 3  # operands: n_terms - 1 steps
    c.data.max_value = 9
    c.data.n_entities = 16  # generic tasks: fact recall over a knowledge table ...
    c.data.n_relations = 2
    c.data.n_symbols = 12  # ... and in-context chains
    c.data.chain_length = 3
    c.data.seq_len = 20
    c.data.num_train = 4096  # arithmetic examples (each format)
    c.data.num_generic_train = 4096
    c.data.num_test = 256  # per evaluation set

    c.teacher = _stage(_model(64, 2, 4, 128), _train(600, 32, 5e-3, 30))
    c.base = _stage(_model(32, 2, 4, 64), _train(600, 32, 1e-2, 30))
    c.student = _stage(None, _train(600, 32, 5e-3, 30))  # fine-tunes base: base's model
    c.alpha = 0.5  # weight of the per-token KL in the CoT+KL student's loss
    return kit.with_preset(c, PRESETS, arg)
