"""LLM-Drop: similarity scores against a float64 reference, identity sublayers, drop orders,
the genuinely smaller model (same logits as zeroing, fewer parameters), the config fields
and save_hf's refusal, bad input, and the smoke preset."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig, generate, load_hf, save_hf
from test_decoder import random_params

from mechinterp import cli, llm_drop
from mechinterp.site_io import capture, intervene, list_sites
from mechinterp.experiments.kit.lm import logits_of
from mechinterp.llm_drop import Sublayer

CONFIG = DecoderConfig(vocab_size=48, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=48)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (6, 7)), jnp.int32)


@pytest.fixture(scope="module")
def decoder():
    model = Decoder(CONFIG)
    return model, random_params(model, TOKENS)


def zeroed_logits(model, params, sublayers):
    sites = list_sites(model, TOKENS)
    return intervene(model, params, TOKENS,
                     interventions=llm_drop.zeroing_interventions(sites, sublayers))


def test_similarity_scores_match_a_float64_reference_with_a_token_mask(decoder):
    model, params = decoder
    mask = np.random.default_rng(1).random(TOKENS.shape) < 0.6
    scores = llm_drop.similarity_scores(model, params, TOKENS, mask, batch_size=3)
    _, acts = capture(model, params, TOKENS, sites=["resid_pre", "resid_mid", "resid_post"])
    acts = {k: np.asarray(v, np.float64) for k, v in acts.items()}
    for kind, (x, y) in {"attn": ("resid_pre", "resid_mid"), "mlp": ("resid_mid", "resid_post"),
                         "block": ("resid_pre", "resid_post")}.items():
        x, y = acts[x][:, mask], acts[y][:, mask]  # (layer, tokens, d)
        cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
        np.testing.assert_allclose(scores[kind], cos.mean(-1), rtol=0, atol=1e-6)
    assert all(0.0 < s < 1.0 for s in scores["attn"])  # random layers do change the stream


def test_an_identity_sublayer_scores_one_and_dropping_it_changes_nothing(decoder):
    model, params = decoder
    params = jax.tree.map(lambda a: a, params)
    params["layers"]["attn"]["wo"] = params["layers"]["attn"]["wo"].at[1].set(0.0)
    scores = llm_drop.similarity_scores(model, params, TOKENS)
    assert scores["attn"][1] == pytest.approx(1.0, abs=1e-6)
    assert scores["attn"][[0, 2]].max() < 0.999
    order = llm_drop.drop_order(model, params, TOKENS, variant="attn", n=1)
    assert order[0][0] == Sublayer("attn", 1)
    small, small_params = llm_drop.drop(model, params, [Sublayer("attn", 1)])
    np.testing.assert_allclose(logits_of(small, small_params, TOKENS),
                               logits_of(model, params, TOKENS), rtol=0, atol=1e-5)


def test_drop_builds_a_smaller_model_with_the_logits_of_zeroing(decoder):
    model, params = decoder
    dropped = [Sublayer("attn", 0), Sublayer("block", 1), Sublayer("mlp", 2)]
    small, small_params = llm_drop.drop(model, params, dropped)
    c = small.config
    assert (c.n_layers, c.attn_layers, c.mlp_layers, c.scan_layers) == (2, (1,), (0,), False)
    assert sorted(small_params) == ["embedding", "layers_0", "layers_1", "lm_head", "norm"]
    assert sorted(small_params["layers_0"]) == ["mlp", "mlp_norm"]  # old layer 0
    assert sorted(small_params["layers_1"]) == ["attn", "attn_norm"]  # old layer 2
    np.testing.assert_array_equal(small_params["layers_1"]["attn"]["wq"],
                                  params["layers"]["attn"]["wq"][2])
    removed = sum(np.size(x) for x in jax.tree.leaves(
        [params["layers"][part] for part in ("attn", "attn_norm", "mlp", "mlp_norm")])) // 3 * 2
    size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
    assert size(small_params) == size(params) - removed
    np.testing.assert_allclose(logits_of(small, small_params, TOKENS),
                               zeroed_logits(model, params, dropped), rtol=0, atol=1e-5)
    shapes = jax.eval_shape(small.init, jax.random.key(0), TOKENS)["params"]
    assert jax.tree.map(np.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, small_params)


def test_a_dropped_model_generates_with_its_kv_cache(decoder):
    model, params = decoder
    small, small_params = llm_drop.drop(model, params, [Sublayer("attn", 1), Sublayer("mlp", 0)])
    out = generate(small, small_params, TOKENS[:2, :4], max_new_tokens=3)
    # greedy decoding with the cache = the argmax of one causal forward over the result
    logits = jax.jit(small.apply)({"params": small_params}, out[:, :-1])
    np.testing.assert_array_equal(out[:, 4:], logits[:, 3:].argmax(-1))


def test_dropping_every_attention_keeps_the_scanned_layout(decoder):
    model, params = decoder
    dropped = [Sublayer("attn", i) for i in range(3)]
    small, small_params = llm_drop.drop(model, params, dropped)
    assert small.config.scan_layers and small.config.attn_layers == ()
    assert sorted(small_params["layers"]) == ["mlp", "mlp_norm"]
    np.testing.assert_allclose(logits_of(small, small_params, TOKENS),
                               zeroed_logits(model, params, dropped), rtol=0, atol=1e-5)
    assert "attn.q" not in list_sites(small, TOKENS)


def test_one_shot_takes_the_top_scores_and_iterative_rescores(decoder):
    model, params = decoder
    scores = llm_drop.similarity_scores(model, params, TOKENS)
    joint = sorted(((scores[k][i], k, i) for k in ("attn", "mlp") for i in range(3)),
                   reverse=True)
    one_shot = llm_drop.drop_order(model, params, TOKENS, variant="joint", n=3)
    assert [(s.kind, s.layer) for s, _ in one_shot] == [(k, i) for _, k, i in joint[:3]]
    np.testing.assert_allclose([score for _, score in one_shot], [s for s, _, _ in joint[:3]],
                               rtol=1e-6)
    iterative = llm_drop.drop_order(model, params, TOKENS, variant="block", n=2, iterative=True)
    first = iterative[0][0]
    assert first.layer == int(np.argmax(scores["block"]))
    rescored = llm_drop.similarity_scores(model, params, TOKENS, dropped=[first])
    assert rescored["block"][first.layer] == pytest.approx(1.0, abs=1e-6)
    rescored["block"][first.layer] = -np.inf
    assert iterative[1] == (Sublayer("block", int(np.argmax(rescored["block"]))),
                            pytest.approx(float(rescored["block"].max()), rel=1e-6))


def test_bad_input_is_refused_with_clear_errors(decoder):
    model, params = decoder
    with pytest.raises(ValueError, match="cannot drop n=4 sublayers with variant 'attn'"):
        llm_drop.drop_order(model, params, TOKENS, variant="attn", n=4)
    with pytest.raises(ValueError, match="variant must be one of"):
        llm_drop.drop_order(model, params, TOKENS, variant="heads", n=1)
    with pytest.raises(ValueError, match="calibration set is empty"):
        llm_drop.similarity_scores(model, params, TOKENS[:0])
    with pytest.raises(ValueError, match="calibration set is empty"):
        llm_drop.similarity_scores(model, params, TOKENS, np.zeros(TOKENS.shape, bool))
    with pytest.raises(ValueError, match="listed twice, or already dropped"):
        llm_drop.drop(model, params, [Sublayer("attn", 1), Sublayer("block", 1)])
    with pytest.raises(ValueError, match="layers 0..2"):
        llm_drop.drop(model, params, [Sublayer("mlp", 3)])
    with pytest.raises(ValueError, match="leaves no layer"):
        llm_drop.drop(model, params, [Sublayer("block", i) for i in range(3)])
    small, small_params = llm_drop.drop(model, params, [Sublayer("attn", 0)])
    with pytest.raises(ValueError, match="already dropped"):
        llm_drop.drop(small, small_params, [Sublayer("attn", 0)])


def test_config_fields_validate_and_normalize():
    base = {"vocab_size": 8, "d_model": 8, "n_layers": 3, "n_heads": 2, "d_mlp": 8}
    assert DecoderConfig(**base, attn_layers=[0, 1, 2]).attn_layers is None
    assert DecoderConfig(**base, attn_layers=()).uniform_layers
    for bad in ((0, 3), (1, 0), (1, 1)):
        with pytest.raises(ValueError, match="sorted distinct layer indices"):
            DecoderConfig(**base, mlp_layers=bad, scan_layers=False)
    with pytest.raises(ValueError, match="set scan_layers=False"):
        DecoderConfig(**base, attn_layers=(0, 2))
    config = DecoderConfig(**base, attn_layers=(0, 2), scan_layers=False)
    assert [config.has_attention(i) for i in range(3)] == [True, False, True]


def test_save_hf_refuses_dropped_sublayers_but_saves_dropped_blocks(decoder, tmp_path):
    model, params = decoder
    small, small_params = llm_drop.drop(model, params, [Sublayer("attn", 1)])
    with pytest.raises(ValueError, match="dropped sublayers .* cannot be saved with save_hf"):
        save_hf(small, small_params, tmp_path / "attn")
    fewer, fewer_params = llm_drop.drop(model, params, [Sublayer("block", 0)])
    assert fewer.config == dataclasses.replace(CONFIG, n_layers=2)
    save_hf(fewer, fewer_params, tmp_path / "block")
    loaded, loaded_params = load_hf(tmp_path / "block")
    assert loaded.config.n_layers == 2
    np.testing.assert_allclose(logits_of(loaded, loaded_params, TOKENS),
                               logits_of(fewer, fewer_params, TOKENS), atol=1e-5)
    want = llm_drop.similarity_scores(fewer, fewer_params, TOKENS)  # analyses run unchanged
    got = llm_drop.similarity_scores(loaded, loaded_params, TOKENS)  # on a load_hf model
    for kind in llm_drop.KINDS:
        np.testing.assert_allclose(got[kind], want[kind], atol=1e-6)


@pytest.mark.slow
def test_smoke_preset_runs_from_the_cli(smoke_run):
    workdir = smoke_run("llm_drop")  # one CLI run per session, shared with test_configs_smoke
    report = (workdir / "report.md").read_text()
    assert "## Genuinely dropped models" in report and "speedup" in report
    assert "| paper's claim | ours | reproduced? |" in report
    assert (workdir / "curves.png").stat().st_size > 0
    run = json.loads((workdir / "run.json").read_text())
    assert run["status"] == "complete" and set(run["figures"]) == {"scores.png", "curves.png"}
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0] and len(results["per_seed"]) == 1
    assert results["headline"]["exact"]["values"] == [
        results["per_seed"][0]["curves"]["attn/one-shot"][0]["all"]["exact"]]


def test_smoke_and_default_presets_hold_the_whole_config():
    smoke = cli.resolve("configs/llm_drop.py", ["preset=smoke"])
    default = cli.resolve("configs/llm_drop.py", [])
    assert (smoke.preset, smoke.seeds, smoke.model.n_layers) == ("smoke", 1, 2)
    assert (default.preset, default.seeds, default.model.n_layers) == ("default", 3, 6)
    assert default.job == "mechinterp.experiments.llm_drop:run"
