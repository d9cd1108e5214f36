"""DiT, DiT-MoE and joint-attention DiT: the forward equals a float64 numpy reference of
adaLN-Zero (1e-4), scanned and unrolled layers agree, DiT-MoE's routing and balance loss
follow the paper's formulas, joint attention reads the conditioning tokens (and a mask
cuts them off), and the Euler sampler equals a plain loop, with per-step interventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp
from mechinterp import Intervention
from mechinterp.family import HasLayers, has
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.models.diffusion import at_steps, euler_sample, flow_pair
from mechinterp.models.dit import DiT, patchify, unpatchify
from mechinterp.models.moe import AUX_LOSS
from random_params import random_variables

B = 3
X = np.random.default_rng(1).normal(size=(B, 8, 8, 2)).astype(np.float32)
T = np.array([0.1, 0.5, 0.9], np.float32)
Y = np.array([0, 3, 4])
SMALL = dict(channels=2, d_model=16, n_heads=2, d_mlp=24, n_classes=5, freq_dim=8)


def _ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1 + np.exp(-x))


def reference(p, model, x, t, y):
    """The dense DiT forward in float64 numpy, written from the paper's description."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    d, h = model.d_model, model.n_heads
    tok = patchify(np.asarray(x, np.float64), model.patch_size)
    tok = np.asarray(tok) @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"] + p["pos_embed"]
    half = model.freq_dim // 2
    args = 1000 * t[:, None] * np.exp(-np.log(1e4) * np.arange(half) / half)[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], -1)
    dense = lambda a, q: a @ q["kernel"] + q["bias"]  # noqa: E731
    c = dense(_silu(dense(temb, p["t_mlp_in"])), p["t_mlp_out"]) + p["class_embed"]["embedding"][y]
    for i in range(model.n_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        mod = dense(_silu(c), lp["modulation"]).reshape(-1, 6, d)
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, j, None] for j in range(6))
        a_in = _ln(tok) * (1 + sc1) + sh1
        at = lp["attn"]
        q = np.einsum("bte,ehd->bthd", a_in, at["wq"]) + at["bq"]
        k = np.einsum("bte,ehd->bthd", a_in, at["wk"]) + at["bk"]
        v = np.einsum("bte,ehd->bthd", a_in, at["wv"]) + at["bv"]
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        attn = np.einsum("bthd,hde->bte", np.einsum("bhqk,bkhd->bqhd", w, v), at["wo"])
        tok = tok + g1 * attn
        m_in = _ln(tok) * (1 + sc2) + sh2
        mp = lp["mlp"]
        tok = tok + g2 * (_gelu(m_in @ mp["up"] + mp["up_bias"]) @ mp["down"] + mp["down_bias"])
    sh, sc = np.split(dense(_silu(c), p["final_modulation"]), 2, -1)
    out = dense(_ln(tok) * (1 + sc[:, None]) + sh[:, None], p["final_proj"])
    return unpatchify(out, model.patch_size, 8, 8, model.channels)


@pytest.fixture(scope="module")
def dense():
    model = DiT(**SMALL)
    return model, random_variables(model, X, T, Y)["params"]


@pytest.fixture(scope="module")
def moe():
    model = DiT(**SMALL, n_experts=4, d_expert=8, d_shared=8)
    return model, random_variables(model, X, T, Y)["params"]


def test_forward_matches_float64_reference_and_unrolled(dense):
    model, params = dense
    out = model.apply({"params": params}, X, T, Y)
    np.testing.assert_allclose(out, reference(params, model, X, T, Y), atol=1e-4, rtol=1e-4)
    unrolled = DiT(**SMALL, scan_layers=False)
    per_layer = {k: v for k, v in params.items() if k != "layers"}
    for i in range(model.n_layers):
        per_layer[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    np.testing.assert_allclose(unrolled.apply({"params": per_layer}, X, T, Y), out, atol=1e-5)
    assert has(model, HasLayers) and model.layer_structure().n_layers == 2
    np.testing.assert_array_equal(unpatchify(patchify(X, 2), 2, 8, 8, 2), X)


def test_fresh_init_is_adaln_zero():
    model = DiT(**SMALL)
    init = jax.jit(model.init, compiler_options=FAST_COMPILE)
    params = init(jax.random.key(0), X, T, Y)["params"]
    out, cache = mechinterp.capture(model, params, X, T, Y, sites=["adaln", "resid_pre",
                                                                   "resid_post"])
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(cache["adaln"]) == 0)
    np.testing.assert_array_equal(cache["resid_post"][-1], cache["resid_pre"][0])


def test_dit_moe_routing_and_balance_loss(moe):
    model, params = moe
    out, state = model.apply({"params": params}, X, T, Y, mutable=[AUX_LOSS])
    _, cache = mechinterp.capture(model, params, X, T, Y, sites=[
        "moe.router_probs", "moe.topk_indices", "moe.topk_weights", "moe.shared_out"])
    probs = np.asarray(cache["moe.router_probs"], np.float64)      # (layer, b, pos, E)
    idx = np.asarray(cache["moe.topk_indices"])
    np.testing.assert_allclose(cache["moe.topk_weights"],
                               np.take_along_axis(probs, idx, -1), atol=1e-6)  # not renormed
    assert np.all(np.asarray(cache["moe.topk_weights"]).sum(-1) < 1)
    assert np.abs(np.asarray(cache["moe.shared_out"])).min(initial=1) >= 0
    assert np.abs(np.asarray(cache["moe.shared_out"])).max() > 0
    e, k = 4, 2
    for layer in range(model.n_layers):
        n = idx[layer].reshape(-1, k).shape[0]
        count = np.bincount(idx[layer].ravel(), minlength=e)
        f = e * count / (k * n)
        expect = 0.01 * np.sum(f * probs[layer].reshape(-1, e).mean(0))
        got = np.asarray(jax.tree.leaves(state[AUX_LOSS])[0])[layer]
        np.testing.assert_allclose(got, expect, rtol=1e-5)
    assert model.active_mlp_params() == DiT(**{**SMALL, "d_mlp": 24}, mlp="swiglu"
                                            ).active_mlp_params() + 16 * 4
    ablated = mechinterp.experts.ablate_experts(model, params, X, [(0, 1)], t=T, y=Y)
    assert np.abs(np.asarray(ablated) - np.asarray(out)).max() > 1e-4


def test_joint_attention_reads_conditioning_tokens():
    model = DiT(**{**SMALL, "n_classes": 0}, cond_vocab=6, n_cond=2)
    cond_a, cond_b = np.array([[1, 2]] * B), np.array([[4, 5]] * B)
    params = random_variables(model, X, T, cond=cond_a)["params"]
    run = lambda c, m=None: np.asarray(model.apply(  # noqa: E731
        {"params": params}, X, T, cond=c, attn_mask=m))
    assert np.abs(run(cond_a) - run(cond_b)).max() > 1e-3
    n = model.n_tokens
    cut = np.ones((B, n, n), bool)
    cut[:, 2:, :2] = False                        # image queries cannot see the cond tokens
    np.testing.assert_allclose(run(cond_a, cut), run(cond_b, cut), atol=1e-6)
    sites = mechinterp.list_sites(model, X, T, cond=cond_a)
    assert sites["attn.pattern"].shape == (2, B, 2, n, n) and n == 18
    with pytest.raises(ValueError, match="n_cond"):
        model.apply({"params": params}, X, T)


def test_euler_sampler_matches_loop_and_steps_carry_interventions(dense):
    model, params = dense
    noise, n = X, 4
    images, cache = euler_sample(model, params, noise, n, sites=("resid_pre",), y=Y)
    x = noise.astype(np.float64)
    for k in range(n):
        t = np.full(B, 1 - k / n, np.float32)
        x = x - np.asarray(model.apply({"params": params}, x.astype(np.float32), t, Y)) / n
    np.testing.assert_allclose(images, x, atol=1e-5)
    assert cache["resid_pre"].shape == (n, 2, B, 16, 16)
    iv = at_steps(Intervention.zero(mask=np.array([1.0, 0.0])[:, None, None, None]), [2], n)
    edited, cache2 = euler_sample(model, params, noise, n, sites=("resid_pre",),
                                  interventions={"resid_post": iv}, y=Y)
    np.testing.assert_array_equal(cache2["resid_pre"][:2], cache["resid_pre"][:2])
    assert np.abs(np.asarray(cache2["resid_pre"][2, 1])).max() == 0    # layer 0 zeroed
    assert np.abs(np.asarray(edited) - np.asarray(images)).max() > 1e-4
    single = mechinterp.intervene(model, params, noise, np.ones(B, np.float32), Y,
                                  interventions={"resid_post": Intervention.zero(
                                      mask=np.array([1.0, 0.0])[:, None, None, None])})
    one, _ = euler_sample(model, params, noise, 1, y=Y, interventions={"resid_post": at_steps(
        Intervention.zero(mask=np.array([1.0, 0.0])[:, None, None, None]), [0], 1)})
    np.testing.assert_allclose(one, noise - np.asarray(single), atol=1e-6)
    with pytest.raises(ValueError, match="leading step axis"):
        euler_sample(model, params, noise, n, y=Y,
                     interventions={"resid_post": Intervention.zero()})
    x_t, v = flow_pair(X, noise * 0 + 1, np.array([0.0, 1.0, 0.5]))
    np.testing.assert_allclose(x_t[1], 1.0) and np.testing.assert_allclose(x_t[0], X[0])
    np.testing.assert_allclose(v, 1 - X)
