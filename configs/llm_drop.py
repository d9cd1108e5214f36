"""LLM-Drop ("What Matters in Transformers? Not All Attention is Needed") at small scale.

    mechinterp run configs/llm_drop.py                 # 3 seeds, 4 min on 2 CPU cores
    mechinterp run configs/llm_drop.py preset=smoke    # seconds; the CI smoke test
    mechinterp run configs/llm_drop.py seeds=1 workdir=runs/llm_drop1

Trains ``seeds`` 6-layer decoders (training seeds seed, seed+1, ...) on synthetic tasks,
scores every attention / MLP sublayer and block by cos(X, X + f(norm X)) on calibration
prompts, drops them one-shot and iteratively (attention-only, MLP-only, block and joint),
and writes ``WORKDIR/report.md`` with loss and accuracy vs number dropped, the measured
speedup of the genuinely smaller models and the paper's claims against ours (mean ± sd
over seeds; see :mod:`mechinterp.experiments.llm_drop`). This file holds the whole config;
``preset=NAME`` selects a preset and ``key=value`` overrides apply on top. A second run in
the same workdir reuses the models (fingerprint-checked).

On a checkpoint loaded with ``mechinterp.models.load_hf`` the same functions apply:
``mechinterp.llm_drop.similarity_scores`` / ``drop_order`` on calibration token ids from
its tokenizer, then ``drop(model, params, sublayers)``.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    # the CI smoke test: one seed, two tiny layers, a few training steps
    "smoke": {
        **kit.lm.SMOKE,
        "analysis.n_calibration": 8, "analysis.n_eval": 32, "analysis.timing_repeats": 2,
    },
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.llm_drop:run", workdir="runs/llm_drop")
    # independently trained models (training seeds seed, seed+1, ...);
    # 3 seeds measured 4 min wall (233 s of CPU) on 2 cores shared with other jobs
    c.seeds = 3

    # data, model, train: the shared decoder and its task mixture
    kit.lm.base_config(c, n_layers=6, tasks={
        "recall": {}, "chain": {"n_symbols": 12, "length": 3, "weight": 2.0}})

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_calibration = 128  # training prompts scored
    c.analysis.n_eval = 256  # test examples for loss / accuracy
    c.analysis.timing_repeats = 10
    return kit.with_preset(c, PRESETS, arg)
