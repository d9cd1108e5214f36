"""Depth efficiency ("Do Language Models Use Their Depth Efficiently?") at small scale.

    mechinterp run configs/depth_efficiency.py                # 3 seeds, 8 min on 2 CPU cores
    mechinterp run configs/depth_efficiency.py preset=smoke   # seconds; the CI smoke test
    mechinterp run configs/depth_efficiency.py seeds=1 workdir=runs/depth1

For each training seed (``seeds`` of them: seed, seed+1, ...) trains a deep and a shallow
decoder on the same synthetic tasks and writes ``WORKDIR/report.md``: per-layer relative
contributions and cosines with the residual, the layer-skip effect matrix, the logit lens,
ridge maps (R^2) from the shallow model's residual stream to the deep model's, and the
paper's claims against ours (mean ± sd over seeds; see
:mod:`mechinterp.experiments.depth_efficiency`). This file holds the whole config;
``preset=NAME`` selects a preset and ``key=value`` overrides apply on top.

The analysis functions in :mod:`mechinterp.depth_efficiency` take any decoder, e.g. one
from ``mechinterp.models.load_hf``, with token ids from its tokenizer.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    # the CI smoke test: one seed, a 2- and a 1-layer model, a few training steps
    "smoke": {
        **kit.lm.SMOKE,
        "shallow_layers": 1, "analysis.n_eval": 24,
    },
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.depth_efficiency:run",
               workdir="runs/depth_efficiency")
    # independently trained (deep, shallow) pairs (seeds seed, seed+1, ...);
    # 3 seeds measured 8.4 min wall (323 s of CPU) on 2 cores shared with other jobs
    c.seeds = 3
    c.shallow_layers = 3  # the deep model has model.n_layers

    # data, model, train: the shared decoder and its task mixture
    kit.lm.base_config(c, n_layers=6, tasks={
        "recall": {}, "chain": {"n_symbols": 12, "length": 3, "weight": 2.0}})

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_eval = 256  # test examples
    c.analysis.top_k = 5  # logit lens overlap
    c.analysis.ridge = 1e-3
    return kit.with_preset(c, PRESETS, arg)
