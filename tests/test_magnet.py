"""The graph recommenders: segment_sum propagation against a dense normalized adjacency in
float64, MAGNET's router as a site, top-K metrics against scikit-learn, the entropy
trigger, BPR negatives, and the smoke run's results."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from mechinterp import Intervention, capture
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.models.graph_rec import MAGNET, ROLES, LightGCN, RecGraph, propagate
from mechinterp.train import user_item


def _data(seed=0):
    return user_item.make_interactions(
        n_users=20, n_items=30, n_topics=3, d_latent=4, zipf=1.0, pop_weight=1.0,
        temperature=2.0, mean_extra=2.0, visual_dim=5, text_dim=3, content_noise=0.5,
        conflict=0.2, test_fraction=0.2, head_fraction=0.2, seed=seed)


def _init(model, *inputs):
    return jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.key(0),
                                                              *inputs)["params"]


def _dense_normalized(data):
    n = data.n_users + data.n_items
    a = np.zeros((n, n))
    for u, i in data.train:
        a[u, data.n_users + i] = a[data.n_users + i, u] = 1.0
    d = np.maximum(a.sum(1), 1) ** -0.5
    return d[:, None] * a * d[None]


def test_propagation_matches_dense_normalized_adjacency_in_float64():
    data = _data()
    x = np.random.default_rng(0).normal(size=(data.n_users + data.n_items, 6))
    with jax.enable_x64(True):
        edges = user_item.user_item_edges(data.train, data.n_users, data.n_items, jnp.float64)
        got = np.asarray(propagate(jnp.asarray(x), edges, len(x)))
        assert got.dtype == np.float64
    np.testing.assert_allclose(got, _dense_normalized(data) @ x, rtol=1e-12, atol=1e-12)


def test_lightgcn_is_the_layer_mean_of_adjacency_powers():
    data = _data()
    graph = data.graph(knn=3)
    model = LightGCN(data.n_users, data.n_items, d_model=4, n_layers=3)
    users, items = np.array([0, 1]), np.array([[0, 1], [2, 3]])
    params = _init(model, graph, users, items)
    u, i, _ = jax.jit(model.apply, static_argnames="method")(
        {"params": params}, graph, method=model.embeddings)
    e0, a = np.asarray(params["embedding"], np.float64), _dense_normalized(data)
    expected = (e0 + a @ e0 + a @ a @ e0 + a @ a @ a @ e0) / 4
    np.testing.assert_allclose(np.concatenate([u, i]), expected, atol=2e-6)


def test_patching_the_router_to_one_expert_gives_that_experts_output():
    data = _data()
    graph = data.graph(knn=3)
    model = MAGNET(data.n_users, data.n_items, d_model=4)
    users, items = np.array([0, 1]), np.array([[0, 1], [2, 3]])
    params = _init(model, graph, users, items)
    leaves, tree = jax.tree.flatten(params)  # experts start at zero: give them weights
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32)
                                       for x in leaves])
    k = ROLES.index("dominant_v")
    onehot = jnp.zeros((data.n_items, len(ROLES))).at[:, k].set(1.0)
    _, cache = capture(model, params, graph, users, items, sites=["moe.expert_out", "moe_out"],
                       interventions={"moe.router_probs": Intervention(scale=0.0, add=onehot)})
    np.testing.assert_allclose(cache["moe_out"], cache["moe.expert_out"][:, k], atol=1e-5)
    assert np.abs(cache["moe_out"]).max() > 0.1  # not the zero-initialized experts


def test_top_k_metrics_match_a_direct_count_and_sklearn_ndcg():
    data = _data(1)
    rng = np.random.default_rng(2)
    u_emb, i_emb = rng.normal(size=(data.n_users, 3)), rng.normal(size=(data.n_items, 3))
    k = 5
    got = user_item.top_k_metrics(u_emb, i_emb, data, k)
    scores = u_emb @ i_emb.T
    recalls, truth_rows, score_rows = [], [], []
    for u in range(data.n_users):
        trained = set(data.train[data.train[:, 0] == u, 1])
        tested = set(data.test[data.test[:, 0] == u, 1])
        if not tested:
            continue
        ranked = [i for i in np.argsort(-scores[u]) if i not in trained][:k]
        recalls.append(len(tested & set(ranked)) / len(tested))
        truth = np.isin(np.arange(data.n_items), list(tested)).astype(float)
        s = scores[u].copy()
        s[list(trained)] = -1e9
        truth_rows.append(truth)
        score_rows.append(s)
    np.testing.assert_allclose(got["recall"], np.mean(recalls), rtol=1e-12)
    np.testing.assert_allclose(got["ndcg"], ndcg_score(np.array(truth_rows),
                                                       np.array(score_rows), k=k), rtol=1e-9)
    assert 0 <= got["recall_tail"] <= 1 and 0 <= got["ndcg_tail"] <= 1


def test_entropy_trigger_switches_once_from_coverage_to_specialization():
    flat = user_item.EntropyTrigger(min_step=3, max_step=50, tolerance=1e-3)
    moving = user_item.EntropyTrigger(min_step=3, max_step=10, tolerance=1e-3)
    signs = []
    for t in range(20):
        signs.append(flat.sign())
        flat.update(t, 0.8)
        moving.update(t, 0.9 - 0.05 * t)
    assert flat.fired_at == 3 and signs[:4] == [-1.0] * 4 and signs[4:] == [1.0] * 16
    assert moving.fired_at == 10  # still changing: fires at max_step


def test_bpr_negatives_are_never_training_items():
    data = _data()
    users, items = user_item.bpr_batches(data.train, data.n_items, 500,
                                         np.random.default_rng(0))
    seen = {(int(u), int(i)) for u, i in data.train}
    assert all((int(u), int(i)) in seen for u, i in zip(users, items[:, 0]))
    assert not any((int(u), int(i)) in seen for u, i in zip(users, items[:, 1]))


def test_smoke_run_reports_metrics_and_the_routing_trace(smoke_run):
    workdir = smoke_run("magnet")
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["models"]) == {"mf", "lightgcn", "magnet"}
    for runs in results["models"].values():
        for key in ("recall", "ndcg", "recall_tail", "ndcg_tail"):
            assert 0 <= runs["per_seed"][0][key] <= 1
    magnet = results["models"]["magnet"]["per_seed"][0]
    assert 5 <= magnet["trigger_step"] <= 15  # trigger.min_step / max_step of the preset
    np.testing.assert_allclose(sum(magnet["routing"].values()), 1.0, atol=1e-5)
    with np.load(workdir / "results.npz") as arrays:
        assert arrays["entropy/magnet"].shape == (1, 30)
        assert np.all((arrays["entropy/magnet"] >= 0) & (arrays["entropy/magnet"] <= 1 + 1e-6))
    assert "MAGNET beats LightGCN" in (workdir / "report.md").read_text()


def test_site_table_in_docs_matches_magnet_sites():
    from test_docs import _documented_rows

    documented = _documented_rows("## Graph recommenders")
    assert documented == {n: (", ".join(s.axes), s.meaning) for n, s in MAGNET.SITES.items()}
    assert set(LightGCN.SITES) < set(MAGNET.SITES)


def test_content_of_the_wrong_size_is_refused_naming_it():
    data = _data()
    graph = data.graph(knn=3)
    short = RecGraph(graph.user_item, graph.item_item, graph.visual[:-1], graph.text)
    with pytest.raises(ValueError, match=r"n_items=30 but graph.visual has 29 rows"):
        jax.eval_shape(MAGNET(data.n_users, data.n_items, 4).init, jax.random.key(0), short,
                       np.array([0]), np.array([[0, 1]]))
