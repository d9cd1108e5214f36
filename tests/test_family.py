"""The family protocol: the decoder families implement every capability, a toy family
implements two and runs the patching grids through them, and an analysis that needs a
missing capability says which."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig, MoEDecoder

import mechinterp as mi
from mechinterp import family, llm_drop, metrics, patching, transcoders
from mechinterp.family import MissingCapability
from test_decoder import random_params
from toy_models import ToyFamily, ToyModel

CONFIG = DecoderConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, d_mlp=32)
ALL = {c.__name__ for c in family.CAPABILITIES}


def tokens(batch=2, length=5, vocab=32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)),
                       jnp.int32)


@pytest.mark.parametrize("model", [
    Decoder(CONFIG),
    MoEDecoder(dataclasses.replace(CONFIG, n_experts=4)),
    Decoder(dataclasses.replace(CONFIG, scan_layers=False, attn_layers=(0, 2))),
], ids=["dense", "moe", "dropped"])
def test_decoders_implement_every_capability(model):
    assert set(family.capabilities(model)) == ALL
    structure = model.layer_structure()
    assert structure.n_layers == 3
    assert structure.residual == ("resid_pre", "resid_mid", "resid_post")
    assert structure.sublayers["attn"] == family.SublayerSites("resid_pre", "attn_out",
                                                               "resid_mid")
    mlp_out = "moe_out" if isinstance(model, MoEDecoder) else "mlp_out"
    assert structure.sublayers["mlp"] == family.SublayerSites("resid_mid", mlp_out,
                                                              "resid_post")
    assert structure.layers_with("mlp") == (0, 1, 2)
    assert structure.layers_with("attn") == (model.config.attn_layers or (0, 1, 2))
    assert set(model.SITES) >= {*structure.residual, "attn_out", mlp_out}
    positions, columns = jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 3), jnp.int32)
    assert set(model.output_selection(positions)) == {"logit_positions"}
    assert set(model.output_selection(positions, columns)) == {"logit_positions",
                                                               "logit_columns"}


def test_decoder_norm_linearisation():
    model = Decoder(CONFIG)
    x = tokens()
    params = random_params(model, x)
    _, cache = mi.capture(model, params, x, sites=["resid_mid"])
    resid = cache["resid_mid"]
    scale = params["layers"]["mlp_norm"]["scale"][:, None, None, :]
    expected = scale * resid / jnp.sqrt(jnp.mean(resid ** 2, -1, keepdims=True)
                                        + CONFIG.rms_norm_eps)
    got = model.sublayer_input(params, "mlp", resid)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.sublayer_input(params, "mlp", resid, frozen=True), got)
    # frozen: the forward is the same, the gradient ignores the 1/rms factor
    grad = jax.grad(lambda r: model.sublayer_input(params, "mlp", r, frozen=True).sum())(resid)
    np.testing.assert_allclose(grad, jnp.broadcast_to(scale, resid.shape)
                               / jnp.sqrt(jnp.mean(resid ** 2, -1, keepdims=True)
                                          + CONFIG.rms_norm_eps), rtol=1e-5)

    def last_logit(embedding, frozen):
        p = {**params, "embedding": embedding}
        if frozen:
            with model.frozen_norms():
                return model.apply({"params": p}, x)[0, -1, 0]
        return model.apply({"params": p}, x)[0, -1, 0]

    np.testing.assert_array_equal(last_logit(params["embedding"], True),
                                  last_logit(params["embedding"], False))
    frozen_grad = jax.grad(last_logit)(params["embedding"], True)
    assert not np.allclose(frozen_grad, jax.grad(last_logit)(params["embedding"], False))
    with pytest.raises(ValueError, match="no sublayer kind 'moe'"):
        model.sublayer_input(params, "moe", resid)


def test_remove_sublayers_gives_a_smaller_model():
    model = Decoder(CONFIG)
    x = tokens()
    params = random_params(model, x)
    small, small_params = model.remove_sublayers(params, [("attn", 1), ("mlp", 1), ("mlp", 2)])
    assert small.layer_structure().n_layers == 2  # layer 1 lost both: removed
    assert small.layer_structure().layers_with("mlp") == (0,)
    assert small.layer_structure().layers_with("attn") == (0, 1)
    assert "mlp" not in small_params["layers_1"] and "mlp_norm" not in small_params["layers_1"]
    with pytest.raises(ValueError, match="listed twice, or already dropped"):
        model.remove_sublayers(params, [("attn", 0), ("attn", 0)])
    with pytest.raises(ValueError, match="kinds are"):
        model.remove_sublayers(params, [("block", 0)])


def test_a_toy_family_runs_the_patching_grids_through_the_protocol():
    model = ToyFamily()
    assert set(family.capabilities(model)) == {"HasLayers", "SelectsOutputs"}
    clean, corrupted = tokens(vocab=11, seed=1), tokens(vocab=11, seed=2)
    params = random_params(model, clean)
    _, cache = mi.capture(model, params, clean)
    metric = metrics.logit_diff(jnp.array([1, 2]), jnp.array([3, 4]))
    selected = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                                progress=False)
    full = patching.get_act_patch_resid_pre(model, params, corrupted, cache,
                                            lambda logits: metric(logits), progress=False)
    assert selected.shape == (model.n_layers, clean.shape[1])
    np.testing.assert_allclose(np.asarray(selected), np.asarray(full), rtol=1e-5, atol=1e-6)
    # patching the clean stream at layer 0 everywhere at the last position gives the clean
    # metric there: the toy's positions do not interact
    np.testing.assert_allclose(selected.values[0, -1], metric(mi.intervene(
        model, params, clean, interventions={})), rtol=1e-5)


@pytest.mark.parametrize("needs, capability, run", [
    ("sweep(reuse=True)", "Resumable", lambda m, p, x, cache: patching.get_act_patch_resid_pre(
        m, p, x, cache, lambda out: out.mean(), reuse=True, progress=False)),
    ("llm_drop.drop", "RemovesSublayers",
     lambda m, p, x, cache: llm_drop.drop(m, p, [llm_drop.Sublayer("mlp", 0)])),
    ("mlp_activations", "LinearisableNorms",
     lambda m, p, x, cache: transcoders.mlp_activations(m, p, x)),
])
def test_a_missing_capability_is_named(needs, capability, run):
    model = ToyFamily()
    x = tokens(vocab=11)
    params = random_params(model, x)
    _, cache = mi.capture(model, params, x, sites=["resid_pre"])
    with pytest.raises(MissingCapability, match=f"ToyFamily has no .*the {capability} "
                                                f"capability.*which {re.escape(needs)}"):
        run(model, params, x, cache)


def test_require_names_the_capability_the_family_and_the_analysis():
    with pytest.raises(MissingCapability) as error:
        family.require(ToyModel(), family.HasLayers, "my_analysis")
    assert str(error.value).startswith(
        "ToyModel has no layer structure (the HasLayers capability of mechinterp.family), "
        "which my_analysis needs")
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)
    decoder = Decoder(CONFIG)
    assert family.require(decoder, family.Resumable, "x") is decoder  # the model itself


@pytest.mark.parametrize("tie", [False, True])
def test_logit_lens_names_read_the_unembedding_through_the_model(tie):
    """Writing a vector as the last residual stream and reading the logits gives the token
    of ``argmax (w * g) W_U``, the formula that used to read ``lm_head`` / ``embedding``
    and the final norm's ``scale`` by name."""
    from mechinterp import probe_prompting

    model = Decoder(dataclasses.replace(CONFIG, vocab_size=40, tie_embeddings=tie))
    params = random_params(model, tokens(1, 4, 40), seed=3)
    tc_params = {"W_dec": jnp.asarray(np.random.default_rng(0).standard_normal((3, 50, 16)),
                                      jnp.float32)}
    features = [(layer, f) for layer in range(3) for f in range(50)]
    vocabulary = [f"w{i}" for i in range(40)]
    unembed = params["embedding"].T if tie else params["lm_head"]
    expected = [vocabulary[int(jnp.argmax((tc_params["W_dec"][layer, f]
                                           * params["norm"]["scale"]) @ unembed))]
                for layer, f in features]
    assert probe_prompting.logit_lens_names(model, params, tc_params, features,
                                            vocabulary) == expected
