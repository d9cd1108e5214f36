"""Direct logit attribution and the logit lens (mechinterp.logit_attribution,
mechinterp.depth_efficiency.logit_lens_top_k, lm.logit_lens / lm.logit_attribution).

Parity: the tiny random LLaMA and Qwen2 (q/k/v biases) models of
tests/test_patching_vs_transformerlens.py, saved the same way (its ``_save_hf_folder``),
loaded by ``load_hf`` and by TransformerLens's ``TransformerBridge``. The bridge's weights
are processed with ``fold_ln`` only (no centering, no value-bias folding), which is
TransformerLens's convention for direct logit attribution: the final norm's weight sits in
``W_U``, and ``apply_ln_to_stack`` divides by the cached ``ln_final.hook_scale``. Ours folds
the weight into ``unembed_directions`` the same way, so every number must agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp import family
from mechinterp import logit_attribution as la
from mechinterp.depth_efficiency import lens_labels, logit_lens_top_k
from mechinterp.family import MissingCapability
from mechinterp.models import Decoder, DecoderConfig, MoEDecoder

RTOL = 1e-4  # float32; atol is RTOL times the largest magnitude of the compared array


def _close(ours, theirs, what):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=RTOL * scale, err_msg=what)
    return float(np.abs(ours - theirs).max() / max(scale, 1e-30))


# --------------------------------------------------------------------------- TransformerLens


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tl_setup(request, tmp_path_factory):
    pytest.importorskip("transformer_lens")
    torch = pytest.importorskip("torch")
    from test_patching_vs_transformerlens import BATCH, SEQ, VOCAB, _save_hf_folder
    from transformer_lens.model_bridge import TransformerBridge

    folder = tmp_path_factory.mktemp(f"dla_{request.param}")
    _save_hf_folder(request.param, folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bridge = TransformerBridge.boot_transformers(str(folder), dtype=torch.float32,
                                                 device="cpu")
    bridge.process_weights(fold_ln=True, center_writing_weights=False, center_unembed=False,
                           fold_value_biases=False)
    bridge.eval()
    tokens = np.random.default_rng(1).integers(4, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(torch.tensor(tokens))
    model, params = mi.models.load_hf(folder)
    logits, cache = mi.capture(model, params, jnp.asarray(tokens), sites=la.dla_sites(model))
    try:
        yield dict(family=request.param, torch=torch, tl_cache=tl_cache, model=model,
                   params=params, cache=cache, tokens=tokens, logits=np.asarray(logits),
                   tl_logits=tl_logits.numpy(), folder=folder)
    finally:
        torch.set_num_threads(threads)


def test_stacks_and_attributions_equal_transformerlens(tl_setup):
    s = tl_setup
    torch, tc, m, p, c = s["torch"], s["tl_cache"], s["model"], s["params"], s["cache"]
    correct, wrong = np.array([5, 7]), np.array([9, 11])
    errors = {}
    _close(s["logits"], s["tl_logits"], "logits")
    with torch.no_grad():
        cases = {
            "decompose_resid": (dict(), dict()),
            "decompose_resid_last_mlp_input": (dict(layer=1, mlp_input=True, pos_slice=-1),
                                               dict(layer=1, mlp_input=True, pos_slice=-1)),
            "stack_head_results": (dict(pos_slice=-1, incl_remainder=True),
                                   dict(pos_slice=-1, incl_remainder=True)),
            "accumulated_resid": (dict(incl_mid=True), dict(incl_mid=True)),
            "accumulated_resid_ln": (dict(apply_ln=True, pos_slice=-1),
                                     dict(apply_ln=True, pos_slice=-1)),
        }
        stacks = {}
        for name, (ours_kw, tl_kw) in cases.items():
            fn = name.split("_last")[0].removesuffix("_ln")
            theirs, tl_labels = getattr(tc, fn)(return_labels=True, **tl_kw)
            ours, labels = getattr(la, fn)(m, p, c, return_labels=True, **ours_kw)
            assert labels == tl_labels, name
            errors[name] = _close(ours, theirs.numpy(), name)
            stacks[name] = (ours, theirs)
        for name in ("decompose_resid_last_mlp_input", "stack_head_results"):
            ours, theirs = stacks[name]
            errors[f"apply_ln_to_stack({name})"] = _close(
                la.apply_ln_to_stack(m, p, c, ours, pos_slice=-1),
                tc.apply_ln_to_stack(theirs, layer=-1, pos_slice=-1).numpy(), name)
        for name, pos in (("decompose_resid", None), ("stack_head_results", -1)):
            ours, theirs = stacks[name]
            ours_attrs = la.logit_attrs(m, p, c, ours, correct, wrong, pos_slice=pos)
            tl_attrs = tc.logit_attrs(theirs, torch.tensor(correct), torch.tensor(wrong),
                                      pos_slice=pos).numpy()
            errors[f"logit_attrs({name})"] = _close(ours_attrs, tl_attrs, name)
        # one token id for every example, over all positions
        ours, theirs = stacks["decompose_resid"]
        errors["logit_attrs(one token)"] = _close(la.logit_attrs(m, p, c, ours, 5),
                                                  tc.logit_attrs(theirs, 5).numpy(), "one")
    print(f"{s['family']}: max relative difference to TransformerLens "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


def test_lens_and_attribution_on_strings(tl_setup):
    """``lm.logit_lens`` names each layer's top tokens; ``lm.logit_attribution`` sums to
    the logit difference (the word-level tokenizer of the parity models: "t0" ... "t95")."""
    lm = mi.load(tl_setup["folder"])
    text = "t40 t50 t60 t70"  # (t1, t2, t3 are special tokens: avoid them as prefixes)
    lens = lm.logit_lens(text, k=3)
    assert lens["layers"] == ["0_pre", "1_pre", "final_post"]
    assert lens["str_tokens"] == lm.to_str_tokens(text)
    assert len(lens["top_tokens"]) == 3 and len(lens["top_tokens"][0]) == 4
    assert all(t.startswith("t") for t in lens["top_tokens"][-1][-1])
    logits = np.asarray(lm(text))[0]
    assert lens["top_tokens"][-1][-1][0] == lm.to_string([int(logits[-1].argmax())])
    np.testing.assert_allclose(lens["top_probs"][-1].sum(-1) <= 1.0 + 1e-6, True)
    result = lm.logit_attribution(["t40 t50 t60", "t5 t6 t7 t8"], "t5", "t9")
    np.testing.assert_allclose(result.layers.sum(0), result.logit_diff, rtol=1e-4,
                               atol=1e-4 * np.abs(result.layers).max())
    assert result.heads.shape == (2, 4, 2)
    assert [label for label, _ in result.top_heads(2)][0].startswith("L")


# --------------------------------------------------------------------------- exactness


CONFIG = DecoderConfig(vocab_size=48, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                       d_mlp=64, qkv_bias=True)


@pytest.mark.parametrize("model", [
    Decoder(CONFIG),
    MoEDecoder(dataclasses.replace(CONFIG, n_experts=4, n_experts_per_tok=2, d_expert=32,
                                   tie_embeddings=True, scan_layers=False)),
], ids=["dense", "moe_tied_unrolled"])
def test_components_sum_to_the_models_logit_difference(model):
    """Embedding + every attention and MLP output, each through the final norm's scale and
    the folded directions, is the model's logit difference; the heads add up to the
    attention outputs; the last accumulated entry is the logit difference too."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (3, 6)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    # larger weights than the init, so the attributions are not all near zero
    params = jax.tree.map(lambda a: a * 4.0 if a.ndim >= 2 else a, params)
    correct, wrong = jnp.array([1, 2, 3]), jnp.array([4, 5, 6])
    r = la.logit_attribution(model, params, tokens, tokens=correct, incorrect_tokens=wrong)
    tol = dict(rtol=1e-4, atol=1e-4 * float(np.abs(r.layers).max()))
    assert r.layer_labels[0] == "embed" and len(r.layer_labels) == 1 + 2 * 3
    np.testing.assert_allclose(r.layers.sum(0), r.logit_diff, **tol)
    np.testing.assert_allclose(r.accumulated[-1], r.logit_diff, **tol)
    attn = [i for i, label in enumerate(r.layer_labels) if label.endswith("attn_out")]
    np.testing.assert_allclose(r.heads.sum(1), r.layers[attn], **tol)
    assert np.abs(r.logit_diff).max() > 0.5  # a non-trivial check
    # the logit lens through the real model equals the accumulated stream read through the
    # folded directions of every token
    _, cache = mi.capture(model, params, tokens, sites=la.dla_sites(model, heads=False))
    stack = la.accumulated_resid(model, params, cache, apply_ln=True)
    lens_logits = stack @ model.unembed_directions(params, jnp.arange(48)).T
    ids, _ = logit_lens_top_k(model, params, tokens, k=1)
    assert ids.shape == (4, 3, 6, 1)
    np.testing.assert_array_equal(ids[..., 0], np.asarray(lens_logits.argmax(-1)))
    assert lens_labels(3) == la.accumulated_resid(model, params, cache,
                                                  return_labels=True)[1]


def test_a_family_without_the_capability_is_told_so():
    from toy_models import ToyFamily, ToyModel

    model = ToyFamily()
    tokens = jnp.zeros((2, 3), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    _, cache = mi.capture(model, params, tokens, sites=la.dla_sites(model, heads=False))
    stack = la.decompose_resid(model, params, cache)  # needs only the layer structure
    assert stack.shape == (3, 2, 3, 8)
    with pytest.raises(MissingCapability, match="ToyFamily has no .*the Unembeds capability"
                                                ".*which apply_ln_to_stack needs"):
        la.logit_attrs(model, params, cache, stack, 1, 2)
    with pytest.raises(MissingCapability, match="Unembeds.*which logit_attribution"):
        la.logit_attribution(model, params, tokens, tokens=1, heads=False)
    with pytest.raises(MissingCapability, match="ToyModel has no layer structure"):
        la.decompose_resid(ToyModel(), params, cache)
    with pytest.raises(KeyError, match="attn.head_out.*dla_sites"):
        la.stack_head_results(model, params, cache)
    assert not family.has(model, family.Unembeds)
