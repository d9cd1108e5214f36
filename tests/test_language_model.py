"""Strings in, strings out (``mechinterp.load`` / :class:`LanguageModel`) and generation
under interventions.

Generation with a KV cache under interventions must equal, token for token, a reference
written here without a cache: at every step it reruns the whole intervened forward on the
sequence so far, the prompt-position fields padded with mask 0 over generated positions.
The string layer runs on a tiny decoder with a word-level tokenizer built here; one test
loads the real SmolLM2 GGUF file.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import mechinterp as mi
from mechinterp.models import Decoder, DecoderConfig, generate, unstack_layers
from mechinterp.models.generate import sample

WORDS = ["<unk>", "<bos>", "<pad>", "the", "cat", "dog", "sat", "on", "mat", "a", "big",
         "red", "ran", "to", "house", "and", "John", "Mary", "gave", "drink", "went", "store"]
CONFIG = DecoderConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_mlp=64)


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(CONFIG)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # weights x10: peaked next-token distributions, so sampling is not near-uniform
    return model, jax.tree.map(lambda w: w * 10 if w.ndim >= 2 else w, params)


# --------------------------------------------------------------------------- generation


def reference_generate(model, params, tokens, mask, max_new_tokens, interventions, rng,
                       temperature=0.0, **sampling):
    """No cache: the full intervened forward on the whole sequence at every step.
    ``interventions`` maps a site to ``(Intervention, position_axes)``: the axes along which
    its fields are given for the prompt's positions (padded here with mask 0)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    keys = jax.random.split(rng, max_new_tokens)
    length = tokens.shape[1]
    for step in range(max_new_tokens):
        now = tokens.shape[1]
        edits = {}
        for name, (iv, axes) in interventions.items():
            fields = {k: np.asarray(v, np.float32) for k, v in iv.fields().items()}
            rank = max(v.ndim for v in fields.values())
            fields = {k: v.reshape((1,) * (rank - v.ndim) + v.shape) for k, v in fields.items()}
            for axis in axes:
                for k, v in fields.items():
                    shape = list(v.shape)
                    shape[axis] = length
                    pad = [(0, 0)] * v.ndim
                    pad[axis] = (0, now - length)
                    fields[k] = np.pad(np.broadcast_to(v, shape), pad,
                                       constant_values={"mask": 0, "scale": 1, "add": 0}[k])
            edits[name] = mi.Intervention(**fields)
        logits = mi.intervene(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                              interventions=edits)
        token = sample(logits[:, -1], keys[step], jnp.float32(temperature),
                       temperature == 0, **sampling)
        tokens = np.concatenate([tokens, np.asarray(token)[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((len(mask), 1), bool)], axis=1)
    return tokens


def prompt_and_edits(model, params):
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, CONFIG.vocab_size, (2, 5))
    mask = np.ones((2, 5), bool)
    mask[1, :2] = False  # row 1 left-padded
    tokens[1, :2] = 2
    clean = rng.integers(3, CONFIG.vocab_size, (2, 5))
    _, cache = mi.capture(model, params, jnp.asarray(clean), jnp.asarray(mask),
                          sites=["resid_pre"])
    steer = jnp.asarray(rng.normal(size=(CONFIG.d_model,)) * 3, jnp.float32)
    at_pos = np.zeros((CONFIG.n_layers, 1, 5, 1), np.float32)
    at_pos[1, :, 3] = 1.0
    head = np.zeros((CONFIG.n_layers, 1, 1, CONFIG.n_heads, 1), np.float32)
    head[0, ..., 2, :] = 1.0
    interventions = {
        "resid_mid": (mi.Intervention.steer(steer, mask=np.eye(CONFIG.n_layers)[1][:, None, None,
                                                                                  None]), ()),
        "resid_pre": (mi.Intervention.patch(cache["resid_pre"], mask=at_pos), (2,)),
        "attn.z": (mi.Intervention.zero(mask=head), ()),
    }
    return tokens, mask, interventions


@pytest.mark.parametrize("how", ["greedy", "sample", "top_k", "top_p"])
def test_generate_under_interventions_equals_the_no_cache_reference(tiny, how):
    model, params = tiny
    tokens, mask, interventions = prompt_and_edits(model, params)
    sampling = {"greedy": {}, "sample": dict(temperature=1.0),
                "top_k": dict(temperature=0.8, top_k=5),
                "top_p": dict(temperature=1.2, top_p=0.7)}[how]
    rng = jax.random.key(3)
    ivs = {name: iv for name, (iv, _) in interventions.items()}
    ours = np.asarray(generate(model, params, tokens, mask, max_new_tokens=6, rng=rng,
                               interventions=ivs, **sampling))
    temperature = sampling.pop("temperature", 0.0)
    ref = reference_generate(model, params, tokens, mask, 6, interventions, rng, temperature,
                             **sampling)
    np.testing.assert_array_equal(ours, ref)
    plain = np.asarray(generate(model, params, tokens, mask, max_new_tokens=6, rng=rng,
                                temperature=temperature, **sampling))
    assert (plain != ours).any(), "the interventions should change the generated tokens"


def test_generate_under_interventions_unrolled_layers_agree(tiny):
    model, params = tiny
    tokens, mask, interventions = prompt_and_edits(model, params)
    ivs = {name: iv for name, (iv, _) in interventions.items()}
    unrolled = Decoder(dataclasses.replace(CONFIG, scan_layers=False))
    a = generate(model, params, tokens, mask, max_new_tokens=4, interventions=ivs)
    b = generate(unrolled, unstack_layers(params, CONFIG.n_layers), tokens, mask,
                 max_new_tokens=4, interventions=ivs)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_pattern_intervention_equals_reference(tiny):
    """A key-position-indexed edit of the attention pattern (cache slots past the prompt
    get mask 0) and a query-broadcast one."""
    model, params = tiny
    tokens, mask, _ = prompt_and_edits(model, params)
    keys = np.zeros((1, 1, 1, 1, 5), np.float32)
    keys[..., 1] = 1.0
    interventions = {"attn.pattern": (mi.Intervention.zero(mask=keys), (4,))}
    ours = generate(model, params, tokens, mask, max_new_tokens=4,
                    interventions={"attn.pattern": interventions["attn.pattern"][0]})
    ref = reference_generate(model, params, tokens, mask, 4, interventions, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_sampling_restrictions():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 400))
    keys = jax.random.key(0)
    top2 = np.asarray(sample(logits, keys, jnp.float32(1.0), False, top_k=2))
    assert set(top2) == {0, 1}
    nucleus = np.asarray(sample(logits, keys, jnp.float32(1.0), False, top_p=0.85))
    assert set(nucleus) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.15
    only = np.asarray(sample(logits, keys, jnp.float32(1.0), False, top_p=0.1))
    assert set(only) == {0}


def test_generate_bad_sampling_and_interventions(tiny):
    model, params = tiny
    tokens = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(model, params, tokens, max_new_tokens=2, top_k=3)
    with pytest.raises(ValueError, match="top_p must be"):
        generate(model, params, tokens, max_new_tokens=2, temperature=1.0, top_p=1.5,
                 rng=jax.random.key(0))
    with pytest.raises(KeyError, match="resid_mdi"):
        generate(model, params, tokens, max_new_tokens=2,
                 interventions={"resid_mdi": mi.Intervention.zero()})
    with pytest.raises(ValueError, match="key_pos"):
        generate(model, params, tokens, max_new_tokens=2,
                 interventions={"attn.pattern": mi.Intervention.steer(0.1)})


# --------------------------------------------------------------------------- strings


def word_tokenizer():
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def lm(tiny):
    model, params = tiny
    return mi.LanguageModel(model, params, word_tokenizer(), bos_token_id=1, eos_token_id=None,
                            pad_token_id=2, add_bos=True)


def test_to_tokens_and_back(lm):
    np.testing.assert_array_equal(lm.to_tokens("the cat sat"), [[1, 3, 4, 6]])
    np.testing.assert_array_equal(lm.to_tokens("the cat sat", prepend_bos=False), [[3, 4, 6]])
    tokens, mask = lm.to_tokens(["the cat", "the big red dog"], return_attention_mask=True)
    np.testing.assert_array_equal(tokens, [[1, 3, 4, 2, 2], [1, 3, 10, 11, 5]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = lm.to_tokens(["the cat", "the big red dog"], padding_side="left")
    np.testing.assert_array_equal(left, [[2, 2, 1, 3, 4], [1, 3, 10, 11, 5]])
    assert lm.to_str_tokens("the cat") == ["<bos>", "the", "cat"]
    assert lm.to_str_tokens(["the cat", "a dog"], prepend_bos=False) == [["the", "cat"],
                                                                        ["a", "dog"]]
    assert lm.to_str_tokens(tokens[0]) == ["<bos>", "the", "cat", "<pad>", "<pad>"]
    assert lm.to_string(jnp.asarray([3, 4, 6])) == "the cat sat"
    assert lm.to_string(jnp.asarray([[3, 4], [9, 5]])) == ["the cat", "a dog"]
    assert lm.to_single_token("cat") == 4
    with pytest.raises(ValueError, match="is 2 tokens"):
        lm.to_single_token("the cat")


def test_unencodable_text_is_an_error(lm):
    with pytest.raises(ValueError, match=r"cannot encode \['zebra'\]"):
        lm.to_tokens("the zebra sat")
    with pytest.raises(ValueError, match="cannot encode"):
        lm.to_tokens(["the cat", "the cat ate a zebra"])


def test_running_on_strings_is_the_functional_api(lm):
    model, params = lm.model, lm.params
    tokens = lm.to_tokens("the cat sat on the mat")
    logits, cache = lm.run_with_cache("the cat sat on the mat", sites=["resid_pre", "attn.z"])
    ref_logits, ref_cache = mi.capture(model, params, tokens, sites=["resid_pre", "attn.z"])
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(cache["attn.z"], ref_cache["attn.z"])
    np.testing.assert_array_equal(lm("the cat sat on the mat"), ref_logits)
    # a padded batch passes the attention mask: each row's real logits as if alone
    batch = lm(["the cat", "the cat sat on the mat"], padding_side="left")
    np.testing.assert_allclose(batch[1], ref_logits[0], atol=1e-5)
    short = lm("the cat")
    np.testing.assert_allclose(batch[0, -3:], short[0], atol=1e-5)
    edit = {"resid_pre": mi.Intervention.zero(mask=np.eye(2)[1][:, None, None, None])}
    np.testing.assert_array_equal(lm.logits("the cat sat", interventions=edit),
                                  mi.intervene(model, params, lm.to_tokens("the cat sat"),
                                               interventions=edit))
    head = mi.components.component("attn.z", layer=1, head=2)
    np.testing.assert_array_equal(
        lm.ablate("the cat sat", [head]),
        mi.ablation.ablate(model, params, lm.to_tokens("the cat sat"), components=[head]))


def test_patching_on_strings(lm):
    clean, corrupted = "John gave a drink to Mary", "Mary gave a drink to John"
    metric = lm.logit_diff("Mary", "John")
    grid = lm.patch(mi.patching.get_act_patch_resid_pre, clean, corrupted, metric,
                    progress=False)
    _, cache = mi.capture(lm.model, lm.params, lm.to_tokens(clean), sites=["resid_pre"])
    ref = mi.patching.get_act_patch_resid_pre(lm.model, lm.params, lm.to_tokens(corrupted),
                                              cache, metric, progress=False)
    np.testing.assert_allclose(np.asarray(grid), np.asarray(ref), atol=1e-6)
    assert grid.shape == (2, 7)
    # a padded batch of pairs: the mask goes to the clean capture and to the sweep
    cleans, corrupteds = ["the cat sat on the mat", "a dog"], ["the dog sat on the mat", "a cat"]
    batch = lm.patch(mi.patching.get_act_patch_resid_pre, cleans, corrupteds,
                     lm.logit_diff("cat", "dog", pos=jnp.asarray([6, 2])), progress=False)
    tokens, mask = lm.to_tokens(cleans, return_attention_mask=True)
    _, cache = mi.capture(lm.model, lm.params, tokens, mask, sites=["resid_pre"])
    ref = mi.patching.get_act_patch_resid_pre(
        lm.model, lm.params, lm.to_tokens(corrupteds), cache,
        lm.logit_diff("cat", "dog", pos=jnp.asarray([6, 2])), progress=False,
        model_kwargs={"attention_mask": mask})
    np.testing.assert_allclose(np.asarray(batch), np.asarray(ref), atol=1e-6)
    estimate = lm.attribution_patch(clean, corrupted, metric, {"resid_pre": ("layer", "pos")})
    assert estimate["resid_pre"].shape == (2, 7)
    with pytest.raises(ValueError, match=r"(?s)pair 1: clean 'the cat sat' has 3 tokens.*"
                                         r"corrupted 'the big cat sat' has 4.*differ by 1 token"):
        lm.patch(mi.patching.get_act_patch_resid_pre, ["the cat", "the cat sat"],
                 ["the dog", "the big cat sat"], metric)


def test_generate_on_strings(lm):
    text = lm.generate("the cat sat", max_new_tokens=3)
    tokens = generate(lm.model, lm.params, lm.to_tokens("the cat sat"), max_new_tokens=3)
    assert text == lm.to_string(tokens[0, 1:])  # BOS dropped
    assert text.startswith("the cat sat ")
    both = lm.generate(["the cat sat", "a dog"], max_new_tokens=2, temperature=0.7, top_k=4,
                       seed=1)
    assert both[1].startswith("a dog ") and len(both[1].split()) == 4
    steer = {"resid_mid": mi.Intervention.steer(jnp.full((CONFIG.d_model,), 3.0))}
    steered = lm.generate("the cat sat", max_new_tokens=3, interventions=steer)
    ref = generate(lm.model, lm.params, lm.to_tokens("the cat sat"), max_new_tokens=3,
                   interventions=steer)
    assert steered == lm.to_string(ref[0, 1:]) and steered != text
    np.testing.assert_array_equal(lm.generate(lm.to_tokens("the cat sat"), max_new_tokens=3),
                                  tokens)


def test_load_hf_folder_with_tokenizer(tiny, tmp_path):
    import json

    from mechinterp.models import save_hf

    model, params = tiny
    save_hf(model, params, tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "pad_token": "<pad>", "add_bos_token": True}))
    lm = mi.load(tmp_path)
    assert (lm.bos_token_id, lm.pad_token_id, lm.add_bos) == (1, 2, True)
    np.testing.assert_array_equal(lm.to_tokens("the cat"), [[1, 3, 4]])
    np.testing.assert_allclose(lm("the cat"), model.apply({"params": params},
                                                          jnp.asarray([[1, 3, 4]])), atol=1e-5)
    with pytest.raises(ValueError, match="neither a .gguf file nor"):
        mi.load(tmp_path / "missing")


def test_load_is_lazy():
    """``import mechinterp`` imports neither the families nor the string layer."""
    import subprocess
    import sys

    code = ("import sys, mechinterp; assert 'mechinterp.language_model' not in sys.modules; "
            "assert 'mechinterp.models' not in sys.modules; "
            "assert mechinterp.load.__module__ == 'mechinterp.language_model'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_strings_in_strings_out(smollm2_lm, monkeypatch, capsys):
    """The README's "Strings in, strings out" example on SmolLM2: its str tokens, greedy
    " Paris", the cache's shapes, a patching grid on strings and steered sampling
    (``mechinterp.load`` returns the fixture's already-loaded model, to load only once)."""
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"## Strings in, strings out.*?```python\n(.*?)```", readme, re.S).group(1)
    import mechinterp.language_model

    monkeypatch.setattr(mechinterp.language_model, "load", lambda path: smollm2_lm)
    namespace = {}
    start = time.perf_counter()
    exec(code, namespace)
    out = capsys.readouterr().out.splitlines()
    print(f"README strings example: {time.perf_counter() - start:.1f} s")
    assert not smollm2_lm.add_bos  # a gpt2-style GGUF tokenizer: no BOS by default
    assert out[0] == str(["The", " capital", " of", " France", " is"])
    assert out[1] == "The capital of France is Paris"
    assert out[2].startswith("The capital of France is")
    assert namespace["logits"].shape == (1, 5, 49152)
    assert namespace["cache"]["resid_pre"].shape == (30, 1, 5, 576)
    grid = namespace["grid"]
    assert grid.shape == (30, 5)
    assert float(grid.values[0, 3]) == pytest.approx(float(grid.values[-1, -1]), abs=1.0)


def test_smollm2_direct_logit_attribution_and_lens(smollm2_lm):
    """Indirect-object identification on SmolLM2: the logit difference Mary - John is about
    +6, its per-component decomposition sums to it, and the top heads by direct logit
    attribution are those docs/decisions.md reports ("Direct logit attribution"); the logit
    lens on strings ends in " Paris"."""
    start = time.perf_counter()
    result = smollm2_lm.logit_attribution(
        "When Mary and John went to the store, John gave a drink to", " Mary", " John")
    print(f"SmolLM2 DLA: {time.perf_counter() - start:.1f} s")
    diff = float(result.logit_diff[0])
    # the numbers docs/decisions.md quotes ("SmolLM2 on IOI"), shown with -s
    print(f"SmolLM2 IOI: logit diff {diff:+.2f}, top heads {result.top_heads(5)}")
    assert 5.0 < diff < 7.5
    assert abs(float(result.layers.sum(0)[0]) - diff) <= 1e-3
    assert abs(float(result.heads.sum((0, 1))[0]) - float(result.layers[
        [i for i, label in enumerate(result.layer_labels) if "attn" in label]].sum())) <= 1e-3
    assert [label for label, _ in result.top_heads(3)] == ["L23H3", "L29H1", "L23H0"]
    start = time.perf_counter()
    lens = smollm2_lm.logit_lens("The capital of France is", k=3)
    print(f"SmolLM2 logit lens: {time.perf_counter() - start:.1f} s")
    assert lens["layers"][0] == "0_pre" and lens["layers"][-1] == "final_post"
    assert len(lens["top_tokens"]) == 31
    assert lens["top_tokens"][-1][-1][0] == " Paris"
