"""Depth efficiency: contributions against a float64 reference, a zero layer, skip effects
and the logit lens against genuinely truncated models, ridge R^2 against scikit-learn and
on a rotated copy of a model (R^2 = 1), and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig
from test_decoder import random_params

from mechinterp import cli, llm_drop
from mechinterp import depth_efficiency as de
from mechinterp.site_io import capture
from mechinterp.experiments.kit.lm import logits_of
from mechinterp.llm_drop import Sublayer

CONFIG = DecoderConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, d_mlp=24)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (6, 8)), jnp.int32)
MASK = np.random.default_rng(1).random(TOKENS.shape) < 0.7


@pytest.fixture(scope="module")
def decoder():
    model = Decoder(CONFIG)
    return model, random_params(model, TOKENS)


def log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl64(p_logits, q_logits):
    lp, lq = log_softmax64(p_logits), log_softmax64(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_layer_contributions_match_a_float64_reference(decoder):
    model, params = decoder
    got = de.layer_contributions(model, params, TOKENS, MASK, batch_size=3)
    _, acts = capture(model, params, TOKENS, sites=["resid_pre", "attn_out", "mlp_out"])
    h, a, m = (np.asarray(acts[k], np.float64)[:, MASK] for k in
               ("resid_pre", "attn_out", "mlp_out"))
    norm = lambda x: np.linalg.norm(x, axis=-1)
    for name, out in (("attn", a), ("mlp", m), ("layer", a + m)):
        np.testing.assert_allclose(got[f"rel_{name}"], (norm(out) / norm(h)).mean(-1), rtol=1e-5)
        cos = (out * h).sum(-1) / norm(out) / norm(h)
        np.testing.assert_allclose(got[f"cos_{name}"], cos.mean(-1), rtol=0, atol=1e-5)


def test_a_zero_layer_contributes_nothing_and_skipping_it_changes_nothing(decoder):
    model, params = decoder
    params = jax.tree.map(lambda x: x, params)
    params["layers"]["attn"]["wo"] = params["layers"]["attn"]["wo"].at[1].set(0.0)
    params["layers"]["mlp"]["down"] = params["layers"]["mlp"]["down"].at[1].set(0.0)
    got = de.layer_contributions(model, params, TOKENS)
    assert got["rel_layer"][1] == 0.0 and got["rel_layer"][[0, 2]].min() > 0.01
    skip = de.skip_effects(model, params, TOKENS)
    assert skip["output_kl"][1] == pytest.approx(0.0, abs=1e-6)
    assert skip["top1_agreement"][1] == 1.0
    assert skip["contribution_change"][1, 2] == pytest.approx(0.0, abs=1e-6)
    assert skip["contribution_change"][0, 2] > 0.01


def test_skip_effects_equal_the_model_with_that_block_removed(decoder):
    model, params = decoder
    skip = de.skip_effects(model, params, TOKENS, MASK)
    full = np.asarray(logits_of(model, params, TOKENS))
    _, base = capture(model, params, TOKENS, sites=["attn_out", "mlp_out"])
    base = np.asarray(base["attn_out"] + base["mlp_out"], np.float64)
    for s in range(3):
        small, small_params = llm_drop.drop(model, params, [Sublayer("block", s)])
        logits, acts = capture(small, small_params, TOKENS, sites=["attn_out", "mlp_out"])
        np.testing.assert_allclose(skip["output_kl"][s], kl64(full, logits)[MASK].mean(),
                                   rtol=1e-3, atol=1e-7)
        agree = (full.argmax(-1) == np.asarray(logits).argmax(-1))[MASK].mean()
        assert skip["top1_agreement"][s] == pytest.approx(agree)
        later = np.asarray(acts["attn_out"] + acts["mlp_out"], np.float64)[s:]  # layers s+1..
        rel = np.linalg.norm(later - base[s + 1:], axis=-1) / np.linalg.norm(base[s + 1:], axis=-1)
        np.testing.assert_allclose(skip["contribution_change"][s, s + 1:],
                                   rel[:, MASK].mean(-1), rtol=1e-4)
        assert np.isnan(skip["contribution_change"][s, :s + 1]).all()


def test_logit_lens_equals_the_model_truncated_after_each_layer(decoder):
    model, params = decoder
    lens = de.logit_lens(model, params, TOKENS, MASK, k=3)
    full = np.asarray(logits_of(model, params, TOKENS))
    assert lens["kl"][-1] == pytest.approx(0.0, abs=1e-6) and lens["topk_overlap"][-1] == 1.0
    top_full = np.argsort(-full, -1)[..., :3]
    for layer in range(3):  # the stream after layer ``layer`` = a model without later blocks
        later = [Sublayer("block", i) for i in range(layer + 1, 3)]
        small, small_params = llm_drop.drop(model, params, later)
        logits = np.asarray(logits_of(small, small_params, TOKENS))
        np.testing.assert_allclose(lens["kl"][layer + 1], kl64(full, logits)[MASK].mean(),
                                   rtol=1e-3, atol=1e-7)
        top = np.argsort(-logits, -1)[..., :3]
        shared = (top_full[..., :, None] == top[..., None, :]).any(-1).mean(-1)
        assert lens["topk_overlap"][layer + 1] == pytest.approx(shared[MASK].mean())


def test_ridge_r2_matches_scikit_learn():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 6))
    y = x @ rng.standard_normal((6, 4)) + 0.5 * rng.standard_normal((200, 4))
    got = de.ridge_r2(x, y, ridge=0.1, test_fraction=0.25, seed=3)
    order = np.random.default_rng(3).permutation(200)
    test, train = order[:50], order[50:]
    xc = x[train] - x[train].mean(0)
    alpha = 0.1 * np.trace(xc.T @ xc) / 6
    fit = Ridge(alpha=alpha).fit(x[train], y[train])
    want = r2_score(y[test], fit.predict(x[test]), multioutput="variance_weighted")
    assert got == pytest.approx(want, abs=1e-10)
    assert de.ridge_r2(x, rng.standard_normal((200, 3))) < 0.1  # unrelated targets


def rotated(params, q):
    """The same function with the residual basis rotated by ``q`` (norm scales must be 1)."""
    into = lambda w: jnp.einsum("ed,le...->ld...", q, w)
    out = lambda w: jnp.einsum("l...e,ed->l...d", w, q)
    layers = params["layers"]
    attn = {**layers["attn"], **{k: into(layers["attn"][k]) for k in ("wq", "wk", "wv")},
            "wo": out(layers["attn"]["wo"])}
    mlp = {"gate": into(layers["mlp"]["gate"]), "up": into(layers["mlp"]["up"]),
           "down": out(layers["mlp"]["down"])}
    return {"embedding": params["embedding"] @ q, "lm_head": q.T @ params["lm_head"],
            "norm": params["norm"],
            "layers": {**layers, "attn": attn, "mlp": mlp}}


def test_a_rotated_copy_of_a_model_maps_with_r2_one(decoder):
    model, params = decoder
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if "scale" in jax.tree_util.keystr(path) else x, params)
    q = jnp.asarray(np.linalg.qr(np.random.default_rng(4).standard_normal((16, 16)))[0],
                    jnp.float32)
    other = rotated(params, q)
    np.testing.assert_allclose(logits_of(model, other, TOKENS),
                               logits_of(model, params, TOKENS), atol=1e-4)
    r2 = de.residual_map_r2(model, params, model, other, TOKENS, ridge=1e-9)
    assert r2.shape == (4, 4)
    np.testing.assert_allclose(np.diag(r2), 1.0, atol=1e-6)
    assert r2[0, 3] < 0.99  # embeddings do not linearly give the last layer's stream


def test_bad_input_is_refused(decoder):
    model, params = decoder
    other = Decoder(DecoderConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, d_mlp=8))
    with pytest.raises(ValueError, match="different vocabularies"):
        de.residual_map_r2(model, params, other, params, TOKENS)
    with pytest.raises(ValueError, match="same tokens"):
        de.ridge_r2(np.zeros((10, 3)), np.zeros((9, 3)))
    with pytest.raises(ValueError, match="too few to fit"):
        de.ridge_r2(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="calibration set is empty"):
        de.layer_contributions(model, params, TOKENS, np.zeros(TOKENS.shape, bool))


@pytest.mark.slow
def test_smoke_preset_runs_from_the_cli(smoke_run):
    workdir = smoke_run("depth_efficiency")  # one CLI run per session, shared with test_configs_smoke
    report = (workdir / "report.md").read_text()
    assert "## Residual maps shallow -> deep" in report and "## Against the paper" in report
    assert {p.name for p in workdir.glob("*.png")} == {
        "contributions.png", "skip.png", "logit_lens.png", "residual_maps.png"}
    assert "| paper's claim | ours | reproduced? |" in report
    assert json.loads((workdir / "run.json").read_text())["status"] == "complete"
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0] and len(results["per_seed"]) == 1
    seed = results["per_seed"][0]
    assert len(seed["deep"]["contributions"]["rel_layer"]) == 2
    assert len(seed["shallow"]["contributions"]["rel_layer"]) == 1
    assert results["headline"]["deep"]["exact"]["values"] == [
        seed["deep"]["metrics"]["all"]["exact"]]


def test_smoke_and_default_presets_hold_the_whole_config():
    smoke = cli.resolve("configs/depth_efficiency.py", ["preset=smoke"])
    default = cli.resolve("configs/depth_efficiency.py", [])
    assert (smoke.preset, smoke.seeds, smoke.shallow_layers) == ("smoke", 1, 1)
    assert (default.preset, default.seeds, default.shallow_layers) == ("default", 3, 3)
    assert default.job == "mechinterp.experiments.depth_efficiency:run"
