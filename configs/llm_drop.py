"""LLM-Drop ("What Matters in Transformers? Not All Attention is Needed") at small scale.

    mechinterp run configs/llm_drop.py                 # a few minutes on 2 CPU cores
    mechinterp run configs/llm_drop.py preset=smoke    # seconds; the CI smoke test

Trains a 6-layer decoder on synthetic tasks, scores every attention / MLP sublayer and
block by cos(X, X + f(norm X)) on calibration prompts, drops them one-shot and iteratively
(attention-only, MLP-only, block and joint), and writes ``WORKDIR/report.md`` with loss and
accuracy vs number dropped and the measured speedup of the genuinely smaller models (see
:mod:`mechinterp.experiments.llm_drop`). A second run in the same workdir reuses the model.

On a checkpoint loaded with ``mechinterp.models.load_hf`` the same functions apply:
``mechinterp.llm_drop.similarity_scores`` / ``drop_order`` on calibration token ids from
its tokenizer, then ``drop(model, params, sublayers)``.
"""

from mechinterp.experiments.llm_drop import default_config


def get_config():
    return default_config()
