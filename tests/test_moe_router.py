"""Routers of the shared MoE layer against per-token float64 numpy references: centroid
distance (Moirai-MoE), expert choice, capacity dropping, jitter, the DiT-MoE balance loss,
the fused-router option, and the bad-input errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import MoE
from mechinterp.models.moe import AUX_LOSS

import mechinterp as mi

E, K, D, M = 6, 2, 6, 8          # d_model == n_experts so an identity router is possible
BATCH, LENGTH = 2, 5


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def layer_params(moe, x, seed=0):
    shapes = jax.eval_shape(moe.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), jnp.float32),
                        nn.unbox(shapes))


def combine(p, x, weights):
    """``out[t] = sum_i weights[t, i] E_i(x[t])`` in float64 for tokens (N, d)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for i in np.flatnonzero(weights[t]):
            h = silu(x[t] @ p["gate"][i]) * (x[t] @ p["up"][i])
            out[t] += weights[t, i] * (h @ p["down"][i])
    return out


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D))


def tokens(x):
    return np.asarray(x, np.float64).reshape(-1, D)


@pytest.mark.parametrize("norm", [False, True])
def test_centroid_router_selects_the_nearest_centroids(x, norm):
    centroids = np.random.default_rng(3).standard_normal((E, D)).astype(np.float32)
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, router="centroid",
              centroids=centroids, norm_topk_prob=norm)
    p = layer_params(moe, x)
    assert "router" not in p                     # the centroids are given, not trained
    out, sites = mi.capture(moe, p, x, sites=["moe.router_logits", "moe.weights"])
    xs = tokens(x)
    weights = np.zeros((xs.shape[0], E))
    for t, v in enumerate(xs):
        dist = ((v - centroids) ** 2).sum(-1)
        nearest = np.argsort(dist)[:K]
        w = softmax(-dist)[nearest]
        weights[t, nearest] = w / w.sum() if norm else w
    np.testing.assert_allclose(np.asarray(sites["moe.router_logits"]).reshape(-1, E),
                               -((xs[:, None] - centroids) ** 2).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sites["moe.weights"]).reshape(-1, E), weights,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, D), combine(p, xs, weights),
                               atol=1e-5)


def test_expert_choice_each_expert_takes_its_top_tokens(x):
    factor = 1.5
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, router="expert_choice",
              capacity_factor=factor)
    p = layer_params(moe, x)
    out = jax.jit(moe.apply)({"params": p}, x)
    xs = tokens(x)
    n = xs.shape[0]
    capacity = math.ceil(factor * n * K / E)             # 5 of the 10 tokens per expert
    probs = np.stack([softmax(v @ np.asarray(p["router"], np.float64)) for v in xs])
    weights = np.zeros_like(probs)
    for i in range(E):
        picked = np.argsort(-probs[:, i], kind="stable")[:capacity]
        weights[picked, i] = probs[picked, i]
    assert ((weights > 0).sum(0) == capacity).all()
    np.testing.assert_allclose(np.asarray(out).reshape(-1, D), combine(p, xs, weights),
                               atol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_capacity_drops_assignments_in_gshard_priority(x, impl):
    factor = 0.5                                          # capacity ceil(0.5*10*2/6) = 2
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, capacity_factor=factor,
              norm_topk_prob=True, d_shared=4, impl=impl)
    p = layer_params(moe, x)
    out, sites = mi.capture(moe, p, x, sites=["moe.weights", "moe.shared_out"])
    xs = tokens(x)
    capacity = math.ceil(factor * xs.shape[0] * K / E)
    router = np.asarray(p["router"], np.float64)
    chosen, w = [], []
    for v in xs:
        probs = softmax(v @ router)
        top = np.argsort(-probs, kind="stable")[:K]
        chosen.append(top)
        w.append(probs[top] / probs[top].sum())
    weights = np.zeros((xs.shape[0], E))
    used = np.zeros(E, int)
    for slot in range(K):                                 # first choices first, in token order
        for t in range(xs.shape[0]):
            i = chosen[t][slot]
            if used[i] < capacity:
                weights[t, i] = w[t][slot]
            used[i] += 1
    assert (weights == 0).all(-1).any()                   # some token is dropped entirely
    np.testing.assert_allclose(np.asarray(sites["moe.weights"]).reshape(-1, E), weights,
                               rtol=1e-5, atol=1e-7)
    shared = np.asarray(sites["moe.shared_out"], np.float64).reshape(-1, D)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, D),
                               combine(p, xs, weights) + shared, atol=1e-5)
    dropless = moe.clone(capacity_factor=None).apply({"params": p}, x)
    assert np.abs(np.asarray(dropless) - np.asarray(out)).max() > 1e-3


def test_jitter_scales_the_router_input_only_when_training(x):
    eps = 0.1
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, jitter_noise=eps)
    p = layer_params(moe, x)
    p["router"] = jnp.eye(D, E)                           # logits == the router's input
    plain = moe.clone(jitter_noise=0.0)
    np.testing.assert_array_equal(moe.apply({"params": p}, x), plain.apply({"params": p}, x))

    out, state = moe.apply({"params": p}, x, rngs={"dropout": jax.random.key(7)},
                           mutable=["intermediates"])
    logits = np.asarray(state["intermediates"]["moe.router_logits"], np.float64)
    factor = logits / np.asarray(x, np.float64)
    assert (np.abs(factor - 1) <= eps + 1e-6).all() and np.abs(factor - 1).max() > eps / 2
    # the experts see the un-jittered input; only the routing moved
    xs = tokens(x)
    weights = np.zeros((xs.shape[0], E))
    for t, row in enumerate(logits.reshape(-1, E)):
        probs = softmax(row)
        top = np.argsort(-probs, kind="stable")[:K]
        weights[t, top] = probs[top]
    np.testing.assert_allclose(np.asarray(out).reshape(-1, D), combine(p, xs, weights),
                               atol=1e-5)


def test_dit_balance_loss_is_alpha_sum_f_p(x):
    alpha = 0.02
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, aux_loss_coef=alpha,
              balance_loss_form="dit")
    p = layer_params(moe, x)
    _, state = moe.apply({"params": p}, x, mutable=[AUX_LOSS])
    xs = tokens(x)
    probs = np.stack([softmax(v @ np.asarray(p["router"], np.float64)) for v in xs])
    counts = np.zeros(E)
    for row in probs:
        counts[np.argsort(-row, kind="stable")[:K]] += 1
    f = E / (K * xs.shape[0]) * counts                    # DeepSeekMoE eq. 12 / DiT-MoE
    want = alpha * np.sum(f * probs.mean(0))
    got = state[AUX_LOSS]["moe_balance_loss"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _, switch = moe.clone(balance_loss_form="switch").apply({"params": p}, x,
                                                           mutable=[AUX_LOSS])
    np.testing.assert_allclose(switch[AUX_LOSS]["moe_balance_loss"][0], K * want, rtol=1e-5)


@pytest.mark.parametrize("impl", [pytest.param("dense", marks=pytest.mark.slow), "ragged"])
def test_fused_router_option_gives_the_same_layer(x, impl):
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, norm_topk_prob=True, impl=impl)
    p = layer_params(moe, x)
    want = jax.jit(moe.apply)({"params": p}, x)
    for router_impl in ("fused", "pallas"):
        got = jax.jit(moe.clone(router_impl=router_impl).apply)({"params": p}, x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


BAD = [
    ({"n_experts_per_tok": 7}, "top-k=7"),
    ({"router": "expert_choice", "n_experts_per_tok": 9}, "top-k=9"),
    ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ({"capacity_factor": -1.0}, "capacity_factor must be > 0"),
    ({"router": "centroid"}, "needs centroids"),
    ({"router": "centroid", "centroids": np.zeros((E, D + 1))}, r"\(6, 6\), got \(6, 7\)"),
    ({"router": "centroid", "centroids": np.zeros((E - 1, D))}, r"got \(5, 6\)"),
    ({"centroids": np.zeros((E, D))}, "used only by router='centroid'"),
    ({"balance_loss_form": "gshard"}, "balance_loss_form='gshard'"),
    ({"router_impl": "cuda"}, "router_impl='cuda'"),
    ({"router": "expert_choice", "aux_loss_coef": 0.1}, "balanced by construction"),
    ({"jitter_noise": -0.1}, "jitter_noise"),
]


@pytest.mark.parametrize("changes,message", BAD)
def test_bad_router_configs(changes, message):
    moe = MoE(n_experts=E, n_experts_per_tok=changes.pop("n_experts_per_tok", K),
              d_expert=M, **changes)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(moe.init, jax.random.key(0), jnp.zeros((1, 2, D)))
