"""MAGNET (multimodal graph experts with entropy-triggered routing), small.

    mechinterp run configs/magnet.py                 # default: 3 seeds
    mechinterp run configs/magnet.py preset=smoke    # seconds; the CI smoke test

Trains MF-BPR, LightGCN and MAGNET (:mod:`mechinterp.models.graph_rec`) on a synthetic
user-item graph with two content modalities and Zipf popularity
(:mod:`mechinterp.train.user_item`); Recall@20 / NDCG@20 overall and on long-tail items,
and MAGNET's routing-entropy trace (:mod:`mechinterp.experiments.magnet`).
"""

import ml_collections

from mechinterp.experiments import kit

PRESETS = {
    "default": {},
    "smoke": {"seeds": 1, "data.n_users": 60, "data.n_items": 80, "model.d_model": 8,
              "train.steps": 30, "train.batch_size": 64, "trigger.min_step": 5,
              "trigger.max_step": 15, "fast_compile": True},
}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="mechinterp.experiments.magnet:run", workdir="runs/magnet")
    c.seeds = 3
    c.models = ("mf", "lightgcn", "magnet")
    c.k = 20
    c.fast_compile = False  # XLA's unoptimized compile: faster for tiny runs

    c.data = ml_collections.ConfigDict()
    c.data.n_users = 600
    c.data.n_items = 800
    c.data.n_topics = 8
    c.data.d_latent = 16
    c.data.zipf = 1.0
    c.data.pop_weight = 1.0
    c.data.temperature = 2.0
    c.data.mean_extra = 10.0
    c.data.visual_dim = 32
    c.data.text_dim = 24
    c.data.content_noise = 0.5
    c.data.conflict = 0.2
    c.data.test_fraction = 0.2
    c.data.head_fraction = 0.2
    c.data.knn = 10

    c.model = ml_collections.ConfigDict()
    c.model.d_model = 32
    c.model.n_layers = 2
    c.model.n_content_layers = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400
    c.train.batch_size = 1024
    c.train.learning_rate = 0.01
    c.train.weight_decay = 1e-4
    c.train.entropy_beta = 0.1

    c.trigger = ml_collections.ConfigDict()
    c.trigger.min_step = 40
    c.trigger.max_step = 200
    c.trigger.tolerance = 2e-4
    return kit.with_preset(c, PRESETS, arg)
