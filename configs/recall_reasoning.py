"""Recall vs reasoning circuits: the README's main command.

    mechinterp run configs/recall_reasoning.py                 # default: 3 seeds per family
    mechinterp run configs/recall_reasoning.py preset=smoke    # seconds; the CI smoke test
    mechinterp run configs/recall_reasoning.py seeds=1 train.steps=3000 workdir=runs/rr1

Trains LLaMA-style and Qwen2-style decoders (``seeds`` independently trained models per
family) on recall + in-context reasoning puzzles, patches (layer x position, heads, MLP
layers, neurons), picks each task's circuit, ablates it (zero and mean) against random
sets of equal size, and writes ``WORKDIR/report.md`` with the 2x2 dissociation, mean ± sd
over seeds (see :mod:`mechinterp.experiments.recall_reasoning`). This file holds the whole
config; ``preset=NAME`` selects a preset and ``key=value`` overrides apply on top. A second
run in the same workdir reuses the trained checkpoints (fingerprint-checked); the same
seed gives the same numbers.

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
   ``ablation_study(model, params, {task: (tokens, answers)}, circuits, n_random=...,
   methods=[...], seed=...)`` and ``dissociation(study, methods, tasks)`` (all in
   :mod:`mechinterp.experiments.recall_reasoning`; ``choose_circuits`` does the circuit
   step for a whole grid set); write tables with
   ``recall_reasoning.report.dissociation_markdown``. On a 0.5B model use ``n_items`` of
   16-32 and expect the neuron grid (layers x d_mlp, e.g. 24 x 4864 cells) to need a GPU.

Setting ``preset=paper`` raises an error pointing here rather than running something
else silently. (The ``paper.hf_path`` key of earlier versions is gone: nothing read it.)
"""

import ml_collections

from mechinterp.experiments import kit

PAPER_STEPS = (
    "preset=paper runs on a real checkpoint and is not automated in this job: the puzzles "
    "are in a synthetic word vocabulary. The steps are in the docstring of "
    "configs/recall_reasoning.py (load_hf, natural-language twins, the same analysis "
    "functions of mechinterp.experiments.recall_reasoning).")


def _paper(config):
    raise ValueError(PAPER_STEPS)


PRESETS = {
    "default": {},
    # the CI smoke test: one family, one seed, a few training steps, tiny grids
    "smoke": {
        "families": "llama", "seeds": 1, "data.n_entities": 8, "data.n_relations": 2,
        "data.n_symbols": 8, "data.num_train": 256, "data.num_test": 64,
        "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.d_mlp": 16,
        "train.steps": 16, "train.warmup_steps": 2, "analysis.n_items": 16,
        "analysis.n_random": 2,
    },
    "paper": _paper,
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.recall_reasoning:run",
               workdir="runs/recall_reasoning")
    c.seeds = 3  # independently trained models per family (training seeds seed, seed+1, ...)
    c.families = "llama,qwen"  # names in mechinterp.experiments.kit.lm.FAMILIES

    c.data = ml_collections.ConfigDict()
    c.data.n_entities = 24
    c.data.n_relations = 3
    c.data.n_symbols = 12
    c.data.chain_length = 3  # symbols per chain: length - 1 hops (>= 2)
    c.data.distractors = 0  # extra chains in the prompt
    c.data.scratchpad = True  # intermediate steps written out before the answer
    c.data.holdout = 0.2  # share of (start, end) chain combinations only in test
    c.data.chain_weight = 3.0  # sampling weight of reasoning vs recall (1) in training
    c.data.seq_len = 16
    c.data.num_train = 8192
    c.data.num_test = 512

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64
    c.model.n_layers = 3
    c.model.n_heads = 4
    c.model.d_mlp = 128

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.learning_rate = 1e-2
    c.train.warmup_steps = 50

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_items = 64  # twin pairs per task (test split)
    c.analysis.coverage = 0.8  # circuit: smallest k covering this share of positive PE
    c.analysis.max_frac = 0.25  # ... capped at this share of the level's components
    c.analysis.neuron_coverage = 0.8
    c.analysis.neuron_max_frac = 0.05
    c.analysis.n_random = 5  # random control sets per circuit
    c.analysis.methods = "zero,mean"
    return kit.with_preset(c, PRESETS, arg)
