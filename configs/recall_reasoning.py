"""Recall vs reasoning circuits: the README's main command.

    mechinterp run configs/recall_reasoning.py                 # default, ~10 min on 2 CPU cores
    mechinterp run configs/recall_reasoning.py preset=smoke    # seconds; the CI smoke test
    mechinterp run configs/recall_reasoning.py seed=1 train.steps=3000 workdir=runs/rr1

Trains a LLaMA-style and a Qwen2-style decoder on recall + in-context reasoning puzzles,
patches (layer x position, heads, MLP layers, neurons), picks each task's circuit, ablates
it (zero and mean) against random sets of equal size, and writes ``WORKDIR/report.md``
with the 2x2 dissociation (see :mod:`mechinterp.experiments.recall_reasoning`).
Overrides are ``key=value``; a key set away from its default wins over the preset. A
second run in the same workdir reuses the trained checkpoints; the same seed gives the
same numbers.

``preset=paper`` (a real LLaMA / Qwen2 checkpoint) is not automated: the puzzles here
live in a synthetic word vocabulary, and a real model needs natural-language twins. The
analysis functions take any decoder, so the steps are:

1. ``model, params = mechinterp.models.load_hf("/path/to/Qwen2.5-0.5B")`` (a local
   Hugging Face folder; LLaMA, Mistral, Qwen2 and Qwen3 load).
2. Build twins with that model's tokenizer (``transformers.AutoTokenizer``) as
   :class:`~mechinterp.experiments.recall_reasoning.Twins`: recall = "The capital of
   France is" / "... of Italy is" (facts the model knows, answer one token); reasoning =
   "A is left of B. B is left of C. So A is left of" / the same with the last premise's
   object changed. Within a task every prompt must have the same token length (pad the
   entity names or pick single-token ones); the answer is read at the last position.
3. For each task call ``patch_task(model, params, twins)``; choose circuits with
   ``select_circuit(level_effects(level, grids), coverage, max_k)`` over
   ``level_components(level, cfg.n_layers, cfg.n_heads, cfg.d_mlp)``; run
   ``ablation_study(model, params, twins, circuits, config)`` and
   ``dissociation(study, config)``; write tables with
   ``dissociation_markdown``. On a 0.5B model use ``n_items`` of 16-32 and expect the
   neuron grid (layers x d_mlp, e.g. 24 x 4864 cells) to need a GPU.

Setting ``preset=paper`` raises an error pointing here rather than running something
else silently.
"""

from mechinterp.experiments.recall_reasoning import default_config


def get_config():
    config = default_config()
    config.job = "mechinterp.experiments.recall_reasoning:run"
    config.workdir = "runs/recall_reasoning"
    return config
