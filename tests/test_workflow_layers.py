"""Workflow-aware layer decomposition (configs/workflow_layers.py): order coding, the
recomposition used by the loss, and the smoke run."""

import itertools
import json

import jax.numpy as jnp
import numpy as np

from mechinterp.experiments import workflow_layers as wl
from mechinterp.train import layered_scenes as ls


def test_pairwise_orders_round_trip_and_recompose_gives_the_illustration():
    orders = np.array([(0, *p) for p in itertools.permutations((1, 2, 3))])
    logits = 4 * (2 * wl.pair_targets(orders) - 1)  # confident, correct pairwise scores
    np.testing.assert_array_equal(wl.order_from_pairs(logits), orders)
    rng = np.random.default_rng(0)
    ills = [ls.illustration(8, rng) for _ in range(4)]
    layers = jnp.asarray(np.stack([i["layers"] for i in ills]))
    got = wl.recompose(layers, wl.order_codes(np.stack([i["order"] for i in ills])))
    np.testing.assert_allclose(np.asarray(got), np.stack([i["inputs"] for i in ills]), atol=1e-5)


def test_smoke_run_scores_layers_and_order(smoke_run):
    workdir = smoke_run("workflow_layers")
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["variants"]) == {"embeddings", "single_head"}
    for v in results["variants"].values():
        s = v["per_seed"][0]
        assert all(0 <= s[f"iou_{n}"] <= 1 for n in ls.ILLUSTRATION_LAYERS)
        assert 0 <= s["order_pairwise"] <= 1 and 0 <= s["order_exact"] <= s["order_pairwise"]
    assert (workdir / "samples.png").stat().st_size > 1000
