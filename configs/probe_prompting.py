"""Probe prompting on a small two-hop model (METHODS.md item 2).

    mechinterp run configs/probe_prompting.py                 # default: 3 seeds, ~4.5 min
    mechinterp run configs/probe_prompting.py preset=smoke    # the CI smoke test
    mechinterp run configs/probe_prompting.py transcoder.activation=jumprelu
    mechinterp run configs/probe_prompting.py seeds=1 workdir=runs/probe_prompting1

Trains a decoder on "capital of the state containing CITY" two-hop prompts (``seeds``
independently trained models: training seeds seed, seed+1, ...; each gets its own
transcoders), one transcoder per layer, builds and prunes attribution graphs for a few
prompts, checks feature ablations against the graphs' predictions, runs probe prompting
and writes ``WORKDIR/report.md`` with the paper's claims next to ours (see
:mod:`mechinterp.experiments.probe_prompting`). This file holds the whole config;
``preset=NAME`` selects a preset and ``key=value`` overrides apply on top.
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    # the CI smoke test: tiny model, transcoders and graphs
    "smoke": {
        "seeds": 1, "data.n_entities": 6, "data.num_train": 256, "data.num_test": 32,
        "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2, "model.d_mlp": 32,
        "train.steps": 16, "train.warmup_steps": 2, "train.batch_size": 16,
        "transcoder.n_features": 32, "transcoder.k": 4, "transcoder.steps": 10,
        "transcoder.batch_size": 8, "transcoder.eval_batches": 1,
        "graph.n_prompts": 2, "graph.n_ablated": 2,
    },
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.probe_prompting:run",
               workdir="runs/probe_prompting")
    # independently trained models, each with its own transcoders: 3 seeds take 266 s on 2
    # nearly idle cores (the decoder and the transcoders 1500 steps each, then graphs and
    # ablations), inside the ~12 min budget of a default run
    c.seeds = 3

    c.data = ml_collections.ConfigDict()
    c.data.n_entities = 16
    c.data.n_relations = 2
    c.data.hop_weight = 3.0  # sampling weight of two-hop vs one-hop recall (1)
    c.data.seq_len = 8
    c.data.num_train = 8192
    c.data.num_test = 256

    c.model = kit.lm.model_block(n_layers=3)  # d_model 64, 4 heads, d_mlp 128
    c.train = kit.lm.train_block(steps=1500, batch_size=64)  # learning rate 1e-2, 50 warmup

    c.transcoder = ml_collections.ConfigDict()
    c.transcoder.n_features = 256
    c.transcoder.activation = "topk"  # relu | topk | jumprelu
    c.transcoder.k = 12
    c.transcoder.sparsity_coef = 1e-3
    c.transcoder.learning_rate = 3e-3
    c.transcoder.steps = 1500
    c.transcoder.batch_size = 64
    c.transcoder.aux_k = 32  # AuxK on features dead in the batch (0: off)
    c.transcoder.eval_batches = 4

    c.graph = ml_collections.ConfigDict()
    c.graph.n_prompts = 5
    c.graph.max_logits = 5
    c.graph.node_threshold = 0.8
    c.graph.edge_threshold = 0.98
    c.graph.n_ablated = 10  # most influential features ablated per prompt
    return kit.with_preset(c, PRESETS, arg)
