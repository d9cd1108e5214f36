"""Strings in, strings out (``mechinterp.load`` / :class:`LanguageModel`) and generation
under interventions.

Generation with a KV cache under interventions must equal, token for token, a reference
written here without a cache: at every step it reruns the whole intervened forward on the
sequence so far, the prompt-position fields padded with mask 0 over generated positions.
The string layer runs on a tiny decoder with a word-level tokenizer built here; one test
loads the real SmolLM2 GGUF file.
"""

import dataclasses
import importlib.util
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
