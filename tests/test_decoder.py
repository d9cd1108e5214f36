"""The decoder family on its own: layouts, padding, dtypes, sites, partitioning, decoding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import mechinterp as mi
from mechinterp.models import (Decoder, DecoderConfig, generate, init_cache, stack_layers,
                               unstack_layers)
from mechinterp.models.layers import Attention, rope_angles, rope_inv_freq
from mechinterp.train.losses import next_token_terms

CONFIG = DecoderConfig(vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                       d_mlp=96, qkv_bias=True, qk_norm=True, rms_norm_eps=1e-5,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0,
                                         original_max_position_embeddings=32))
BATCH, LENGTH = 3, 10


def random_params(model, *inputs, seed=0):
    """Random weights without compiling init: norm scales near 1, the rest normal(0.15)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * noise if is_norm else 0.15 * noise)
    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


def left_padded(tokens, pads):
    """Shift each row right by its pad count (pad id 0) and return (tokens, mask)."""
    tokens = np.asarray(tokens)
    out, mask = np.zeros_like(tokens), np.zeros(tokens.shape, np.int32)
    for row, pad in enumerate(pads):
        out[row, pad:] = tokens[row, :tokens.shape[1] - pad]
        mask[row, pad:] = 1
    return out, mask


@pytest.fixture(scope="module")
def setup():
    model = Decoder(CONFIG)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, LENGTH))
    params = random_params(model, tokens)
    return model, params, tokens


@pytest.fixture(scope="module")
def apply(setup):
    model = setup[0]
    return jax.jit(lambda params, tokens, mask: model.apply({"params": params}, tokens, mask))


def test_config_validation():
    sizes = dict(vocab_size=8, d_model=16, n_layers=1, n_heads=4, d_mlp=8)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        DecoderConfig(**sizes, n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        DecoderConfig(**sizes, rope_scaling=dict(rope_type="yarn", factor=2.0))
    with pytest.raises(ValueError, match="low_freq_factor"):
        DecoderConfig(**sizes, rope_scaling=dict(rope_type="llama3", factor=8.0))
    with pytest.raises(ValueError, match="qk_norm"):
        DecoderConfig(**sizes, architecture="Qwen3ForCausalLM")
    with pytest.raises(ValueError, match="d_head=5"):
        DecoderConfig(**sizes, d_head=5)
    assert DecoderConfig(**sizes, qkv_bias=True).hf_architecture == "Qwen2ForCausalLM"
    assert DecoderConfig(**sizes, rope_scaling=dict(rope_type="default")).rope_scaling is None


def test_scan_equals_unrolled(setup, apply):
    model, params, tokens = setup
    unrolled_params = unstack_layers(params, CONFIG.n_layers)
    assert "layers" not in unrolled_params and "layers_2" in unrolled_params
    jax.tree.map(np.testing.assert_array_equal, stack_layers(unrolled_params), params)

    unrolled = Decoder(dataclasses.replace(CONFIG, scan_layers=False))
    mask = np.ones_like(tokens)
    expected = apply(params, tokens, mask)
    got = jax.jit(unrolled.apply)({"params": unrolled_params}, tokens, mask)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_left_padding_gives_the_same_logits(setup, apply):
    _, params, tokens = setup
    pads = [0, 3, 6]
    padded, mask = left_padded(tokens, pads)
    plain = np.asarray(apply(params, tokens, np.ones_like(tokens)))
    shifted = np.asarray(apply(params, padded, mask))
    for row, pad in enumerate(pads):
        np.testing.assert_allclose(shifted[row, pad:], plain[row, :LENGTH - pad], atol=1e-5)
    assert np.isfinite(shifted).all()  # fully padded query rows do not NaN


def test_plain_call_and_bfloat16(setup, apply):
    model, params, tokens = setup
    reference = np.asarray(apply(params, tokens, np.ones_like(tokens)))
    plain = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
    np.testing.assert_allclose(plain, reference, atol=1e-6)

    bf16 = Decoder(dataclasses.replace(CONFIG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    logits = jax.jit(bf16.apply)({"params": bf16_params}, tokens)
    assert logits.dtype == jnp.bfloat16
    error = np.abs(np.asarray(logits, np.float32) - reference)
    assert error.max() < 0.1 * np.abs(reference).max()
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.8


def collect_sites(tree, found=None):
    """{variable name: value} from a nested intermediates collection (values are the
    sown tuples)."""
    found = {} if found is None else found
    for key, value in tree.items():
        if key in Decoder.SITES:
            assert key not in found, f"site {key} recorded twice"
            found[key] = value[0] if isinstance(value, tuple) else value
        else:
            collect_sites(value, found)
    return found


def test_every_site_is_recorded_with_its_axes(setup):
    model, _, tokens = setup
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, mutable=True))
    sites = collect_sites(variables["intermediates"])
    assert set(sites) == set(Decoder.SITES)
    sizes = dict(layer=CONFIG.n_layers, batch=BATCH, pos=LENGTH, query_pos=LENGTH,
                 key_pos=LENGTH, d_model=CONFIG.d_model, head=CONFIG.n_heads,
                 kv_head=CONFIG.n_kv_heads, d_head=CONFIG.d_head, d_mlp=CONFIG.d_mlp,
                 vocab=CONFIG.vocab_size)
    for name, spec in Decoder.SITES.items():
        assert sites[name].shape == tuple(sizes[a] for a in spec.axes), name
        assert spec.meaning
    per_layer = {k for k, s in Decoder.SITES.items() if s.axes[0] == "layer"}
    assert per_layer == set(collect_sites(variables["intermediates"]["layers"]))


def test_params_carry_logical_axis_names(setup):
    model, _, tokens = setup
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    specs = nn.get_partition_spec(boxed)
    attn = specs["layers"]["attn"]
    assert specs["embedding"] == P("vocab", "embed")
    assert specs["lm_head"] == P("embed", "vocab")
    assert attn["wq"] == P("layers", "embed", "heads", "head_dim")
    assert attn["wk"] == P("layers", "embed", "kv_heads", "head_dim")
    assert attn["wo"] == P("layers", "heads", "head_dim", "embed")
    assert attn["q_norm"]["scale"] == P("layers", "head_dim")
    assert specs["layers"]["mlp"]["down"] == P("layers", "mlp", "embed")
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim
               for x in leaves)


def test_head_out_edits_fold_back(setup, apply):
    """A no-op edit of attn.head_out is bit-identical; zeroing a head through head_out
    equals zeroing it through attn.z (through the public mechinterp API)."""
    model, params, tokens = setup
    plain = apply(params, tokens, np.ones_like(tokens))
    untouched = mi.intervene(model, params, tokens,
                             interventions={"attn.head_out": mi.Intervention.noop()})
    np.testing.assert_array_equal(untouched, plain)

    head = np.zeros((CONFIG.n_layers, 1, 1, CONFIG.n_heads, 1), np.float32)
    head[1, :, :, 2] = 1  # layer 1, head 2
    zero = mi.Intervention.zero(mask=head)
    via_head_out = mi.intervene(model, params, tokens, interventions={"attn.head_out": zero})
    via_z = mi.intervene(model, params, tokens, interventions={"attn.z": zero})
    np.testing.assert_allclose(via_head_out, via_z, atol=1e-5)
    assert np.abs(via_z - plain).max() > 1e-3


def test_backward_recomputes_attention_weights(setup):
    """Training memory: the residuals the backward pass keeps hold no (query_pos, key_pos)
    array but the boolean (batch, query_pos, key_pos) mask. Kept, the attention weights are
    (layers, batch, heads, seq, seq) floats: the 125M-parameter decoder's train step at 4 x
    2048 tokens then needed 131 GiB of GPU temp memory. A no-op edit of ``attn.pattern``
    keeps them (the check sees them) and gives bit-identical gradients."""
    model, params, tokens = setup
    noop = mi.Intervention.noop()

    def loss(p, interventions):
        logits = mi.intervene(model, p, tokens, interventions=interventions)
        return next_token_terms(logits, {"tokens": tokens})["loss"]

    def kept_square(interventions):  # elements of residuals with two sequence axes
        vjp = jax.eval_shape(lambda p: jax.vjp(lambda q: loss(q, interventions), p)[1], params)
        return sum(r.size for r in jax.tree.leaves(vjp) if r.shape.count(LENGTH) == 2)

    assert kept_square({}) == BATCH * LENGTH**2
    weights = CONFIG.n_layers * BATCH * CONFIG.n_heads * LENGTH**2
    assert kept_square({"attn.pattern": noop}) >= weights

    # Gradients of one attention layer through recomputed and through stored weights.
    attn = Attention(n_heads=4, n_kv_heads=2, d_head=8)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 16)), jnp.float32)
    mask = jnp.tril(jnp.ones((6, 6), bool))[None].repeat(2, 0)
    rope = rope_angles(jnp.arange(6)[None].repeat(2, 0), rope_inv_freq(8, 1e4), jnp.float32)
    attn_params = random_params(attn, x, rope, mask)

    def out(p, x, interventions):
        y = attn.apply({"params": p, "interventions": interventions}, x, rope, mask)[0]
        return jnp.sum(y * jnp.cos(y))

    grads = jax.jit(lambda p, x: [jax.grad(out, (0, 1))(p, x, iv) for iv in
                                  ({}, {"attn.pattern": noop.fields()})])(attn_params, x)
    jax.tree.map(np.testing.assert_array_equal, *grads)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads[0]))


def test_cached_forward_equals_full_forward(setup, apply):
    model, params, tokens = setup
    padded, mask = left_padded(tokens, [0, 2, 5])
    full = np.asarray(apply(params, padded, mask))
    step = jax.jit(lambda cache, t, m: model.apply({"params": params}, t, m, cache=cache))
    cache = init_cache(CONFIG, BATCH, LENGTH)
    logits, cache = step(cache, padded[:, :6], mask[:, :6])
    pieces = [np.asarray(logits)]
    for i in range(6, LENGTH):
        logits, cache = step(cache, padded[:, i:i + 1], mask[:, i:i + 1])
        pieces.append(np.asarray(logits))
    cached = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5)
    assert int(cache.index) == LENGTH
    np.testing.assert_array_equal(cache.next_position, mask.sum(1))


def test_greedy_generation_equals_argmax_of_full_forward(setup, apply):
    model, params, tokens = setup
    padded, mask = left_padded(tokens, [0, 2, 5])
    new = 5
    generated = np.asarray(generate(model, params, padded, mask, max_new_tokens=new))
    assert generated.shape == (BATCH, LENGTH + new)
    np.testing.assert_array_equal(generated[:, :LENGTH], padded)

    # Re-run the whole forward on the growing sequence (no cache). Causality lets one
    # fixed-size buffer stand for every prefix: positions past the prefix cannot matter.
    sequence = np.concatenate([padded, np.zeros((BATCH, new), padded.dtype)], axis=1)
    seq_mask = np.concatenate([mask, np.ones((BATCH, new), mask.dtype)], axis=1)
    for i in range(LENGTH, LENGTH + new):
        logits = apply(params, sequence, seq_mask)
        sequence[:, i] = np.asarray(logits[:, i - 1].argmax(-1))
    np.testing.assert_array_equal(generated, sequence)

    unrolled = Decoder(dataclasses.replace(CONFIG, scan_layers=False))
    again = generate(unrolled, unstack_layers(params, CONFIG.n_layers), padded, mask,
                     max_new_tokens=new)
    np.testing.assert_array_equal(again, generated)


def test_sampling_is_reproducible(setup):
    model, params, tokens = setup
    sample = lambda seed: np.asarray(generate(  # noqa: E731
        model, params, tokens, max_new_tokens=8, temperature=1.5, rng=jax.random.key(seed)))
    first = sample(0)
    np.testing.assert_array_equal(first, sample(0))
    assert (first != sample(1)).any()


def test_generate_refuses_bad_arguments(setup):
    model, params, tokens = setup
    right_padded = np.ones_like(tokens)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(model, params, tokens, right_padded)
    with pytest.raises(ValueError, match="rng"):
        generate(model, params, tokens, temperature=1.0)
