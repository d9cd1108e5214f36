"""Neuron partitions ("bricks", from "Configurable Foundation Models") at small scale.

    mechinterp run configs/bricks.py                 # default: 3 seeds, ~2.5 min
    mechinterp run configs/bricks.py preset=smoke    # seconds; the CI smoke test
    mechinterp run configs/bricks.py seeds=1 workdir=runs/bricks1

Trains a decoder (``seeds`` independently trained models: training seeds seed, seed+1, ...)
on four task-token-marked synthetic tasks, measures per-task MLP neuron activation
frequencies and specialization, clusters the neurons by co-activation into partitions, and
ablates each partition against random neuron sets of equal size, writing the task x
partition accuracy-drop matrix and the claims table to ``WORKDIR/report.md`` (see
:mod:`mechinterp.experiments.bricks`). The functions in :mod:`mechinterp.bricks` take any
decoder with an ``mlp.hidden`` site, e.g. one from ``mechinterp.models.load_hf``. This file
holds the whole config; ``preset=NAME`` selects a preset and ``key=value`` overrides apply
on top.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    # the CI smoke test: a few training steps, tiny model and analysis
    "smoke": {
        **kit.lm.SMOKE,
        "analysis.n_calibration": 32, "analysis.n_eval": 32, "analysis.n_partitions": 3,
        "analysis.n_random": 2,
    },
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.bricks:run", workdir="runs/bricks")
    # independently trained models: 3 seeds take 146 s on 2 nearly idle cores (11 min with
    # the cores shared by 4 other jobs), well inside the ~12 min budget of a default run
    c.seeds = 3

    # data, model, train: the shared decoder and its task mixture
    kit.lm.base_config(c, n_layers=3, tasks={
        "recall": {}, "hop": {"hops": 2, "scratchpad": False, "holdout": 0.0},
        "chain": {"n_symbols": 12, "length": 3}, "arith": {"n_terms": 2, "max_value": 9}})

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_calibration = 256  # training prompts for frequencies and partitions
    c.analysis.n_eval = 384  # test examples for ablation (all tasks)
    c.analysis.quantile = 0.5  # activity threshold: this quantile of |mlp.hidden| per layer
    c.analysis.n_partitions = 8
    c.analysis.n_random = 4  # random neuron sets of equal size per partition
    return kit.with_preset(c, PRESETS, arg)
