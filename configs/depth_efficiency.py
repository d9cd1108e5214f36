"""Depth efficiency ("Do Language Models Use Their Depth Efficiently?") at small scale.

    mechinterp run configs/depth_efficiency.py                 # a few minutes on 2 CPU cores
    mechinterp run configs/depth_efficiency.py preset=smoke    # seconds; the CI smoke test

Trains a deep and a shallow decoder on the same synthetic tasks and writes
``WORKDIR/report.md``: per-layer relative contributions and cosines with the residual, the
layer-skip effect matrix, the logit lens, and ridge maps (R^2) from the shallow model's
residual stream to the deep model's (see :mod:`mechinterp.experiments.depth_efficiency`).

The analysis functions in :mod:`mechinterp.depth_efficiency` take any decoder, e.g. one
from ``mechinterp.models.load_hf``, with token ids from its tokenizer.
"""

from mechinterp.experiments.depth_efficiency import default_config


def get_config():
    return default_config()
