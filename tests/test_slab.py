"""SLAB blocks: RepBN / PRepBN and simplified linear attention against float64 numpy, the
PRepBN schedule, and BatchNorm folded into the next linear layer equal to the unfolded
network in inference mode."""

import jax
import numpy as np
import pytest

from mechinterp.models.slab import LinearAttention, Norm, fold_norms, prepbn_lambda
from mechinterp.models.vit import ViT
from random_params import random_variables

RNG = np.random.default_rng(0)


def test_prepbn_lambda_decays_linearly_to_zero():
    np.testing.assert_allclose([prepbn_lambda(s, 10) for s in (0, 5, 10, 30)],
                               [1.0, 0.5, 0.0, 0.0])


def test_repbn_and_prepbn_match_numpy():
    x = RNG.normal(1.0, 2.0, (4, 5, 6)).astype(np.float32)
    x64 = x.astype(np.float64)
    bn = (x64 - x64.mean((0, 1))) / np.sqrt(x64.var((0, 1)) + 1e-5)
    ln = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    for kind, lam in (("repbn", 0.0), ("prepbn", 0.3)):
        norm = Norm(kind)
        variables = random_variables(norm, x, scale=0.5)
        params = variables["params"]
        out, _ = norm.apply(variables, x, True, lam, mutable=["batch_stats"])
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        rep = bn * p["bn"]["scale"] + p["bn"]["bias"] + p["alpha"] * x64
        expected = rep if kind == "repbn" else (
            lam * (ln * p["scale"] + p["bias"]) + (1 - lam) * rep)
        np.testing.assert_allclose(out, expected, atol=2e-5)


def _depthwise_same(v, kernel, bias):
    k = kernel.shape[0]
    padded = np.pad(v, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = np.zeros_like(v)
    for di in range(k):
        for dj in range(k):
            out += padded[:, di:di + v.shape[1], dj:dj + v.shape[2]] * kernel[di, dj, 0]
    return out + bias


def test_linear_attention_matches_numpy():
    b, grid, h, d, e = 2, 3, 2, 4, 6
    t = 1 + grid * grid  # a class token, which gets no depthwise-convolution term
    x = RNG.normal(size=(b, t, e)).astype(np.float32)
    attn = LinearAttention(h, d, grid, kernel=3)
    params = random_variables(attn, x, scale=0.5)["params"]
    out = attn.apply({"params": params}, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = x.astype(np.float64)
    q, k, v = (np.einsum("bte,ehd->bthd", x64, p[f"w{n}"]) + p[f"b{n}"] for n in "qkv")
    fq, fk = np.maximum(q, 0), np.maximum(k, 0)
    z = np.zeros_like(q)
    for i in range(t):  # out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)
        num = np.einsum("bhd,bjhd,bjhe->bhe", fq[:, i], fk, v)
        den = np.einsum("bhd,bjhd->bh", fq[:, i], fk)[..., None] + 1e-6
        z[:, i] = num / den
    dwc = _depthwise_same(v[:, 1:].reshape(b, grid, grid, h * d), p["dwc"]["kernel"],
                          p["dwc"]["bias"]).reshape(b, grid * grid, h, d)
    z[:, 1:] += dwc
    np.testing.assert_allclose(out, np.einsum("bthd,hde->bte", z, p["wo"]), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("norm,attention,pool", [("batch", "softmax", "cls"),
                                                 ("prepbn", "linear", "mean")])
def test_folded_batchnorm_equals_unfolded_inference(norm, attention, pool):
    model = ViT(image_size=4, patch_size=2, d_model=8, n_layers=2, n_heads=2, d_mlp=16,
                n_classes=3, norm=norm, attention=attention, pool=pool)
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    variables = random_variables(model, x)
    train = jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"])[1])
    for step in range(2):  # running statistics away from their initial 0 / 1
        batch = jax.random.normal(jax.random.key(5 + step), (3, 4, 4, 1)) * 3 + 1
        variables = {**variables, **train(variables, batch)}
    expected = jax.jit(model.apply)(variables, x)  # inference: running stats, lambda = 0
    folded_model, folded = fold_norms(model, variables)
    assert folded_model.norm == "folded" and "norm" not in folded
    assert not any("norm" in k for k in folded["layers"])
    out = jax.jit(folded_model.apply)({"params": folded}, x)
    assert np.abs(np.asarray(expected)).max() > 0.1
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_fold_refuses_layernorm():
    with pytest.raises(ValueError, match="LayerNorm depends on each token"):
        fold_norms(ViT(norm="layer"), {"params": {}})


def test_slab_smoke_run_reports_every_variant_and_an_exact_fold(smoke_run):
    import json

    workdir = smoke_run("slab")
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["variants"]) == {"PRepBN"}
    for variant in results["variants"].values():
        assert 0 <= variant["summary"]["accuracy"]["mean"] <= 1
    latency = results["latency"]
    assert len(latency["tokens"]) == len(latency["softmax"]) == len(latency["linear"]) == 2
    assert results["inference"]["fold_max_abs_diff"] < 1e-4
    with np.load(workdir / "results.npz") as arrays:
        assert arrays["loss/PRepBN"].shape == (1, 4)  # seeds x steps
