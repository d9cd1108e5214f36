"""Neuron partitions ("bricks", from "Configurable Foundation Models") at small scale.

    mechinterp run configs/bricks.py                 # a few minutes on 2 CPU cores
    mechinterp run configs/bricks.py preset=smoke    # seconds; the CI smoke test

Trains a decoder on four task-token-marked synthetic tasks, measures per-task MLP neuron
activation frequencies and specialization, clusters the neurons by co-activation into
partitions, and ablates each partition against random neuron sets of equal size, writing
the task x partition accuracy-drop matrix to ``WORKDIR/report.md`` (see
:mod:`mechinterp.experiments.bricks`). The functions in :mod:`mechinterp.bricks` take any
decoder with an ``mlp.hidden`` site, e.g. one from ``mechinterp.models.load_hf``.
"""

from mechinterp.experiments.bricks import default_config


def get_config():
    return default_config()
