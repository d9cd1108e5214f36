"""The shared MoE layer and the mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE).

Layer level: routing weights, aux losses against hand computation (and transformers'
``load_balancing_loss_func``), the dense and ragged paths against a per-token loop, expert
ablation through ``moe.weights`` and ``moe.expert_out``. Decoder level: sites, bit-identical
no-op edits, scanned = unrolled, aux losses in the collection the train step sums, and logits
within 1e-4 of transformers through ``load_hf``/``save_hf``.
"""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp.models import (DecoderConfig, MoE, MoEDecoder, load_hf, save_hf, stack_layers,
                               unstack_layers)
from mechinterp.models.decoder import Decoder
from mechinterp.models.moe import (AUX_LOSS, balance_loss, capacity_keep, dense_weights,
                                   expert_capacity, route, z_loss)
from mechinterp.train.step import AUX_LOSS as TRAIN_AUX_LOSS

E, K, D, M = 6, 2, 16, 12
BATCH, LENGTH = 2, 5


def silu(x):
    return x / (1 + np.exp(-x))


def layer_params(moe, x, seed=0):
    shapes = jax.eval_shape(moe.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                        nn.unbox(shapes))


def loop_reference(moe, p, x, drop=()):
    """Per-token numpy loop: route, run the top-k experts (minus ``drop``), add shared."""
    p = jax.tree.map(np.asarray, p)
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            logits = v @ p["router"]
            if moe.router == "softmax":
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
            else:
                probs = 1 / (1 + np.exp(-logits))
            top = np.argsort(-probs)[:moe.n_experts_per_tok]
            w = probs[top]
            if moe.norm_topk_prob:
                w = w / w.sum()
            for i, wi in zip(top, w):
                if i in drop:
                    continue
                h = silu(v @ p["gate"][i]) * (v @ p["up"][i])
                out[b, t] += wi * (h @ p["down"][i])
            if moe.d_shared:
                s = (silu(v @ p["shared_gate"]) * (v @ p["shared_up"])) @ p["shared_down"]
                if moe.shared_expert_gated:
                    s = s / (1 + np.exp(-(v @ p["shared_expert_gate"])))
                out[b, t] += s
    return out


LAYERS = {
    "softmax_renorm": dict(router="softmax", norm_topk_prob=True),
    "softmax_raw": dict(router="softmax", norm_topk_prob=False),
    "sigmoid": dict(router="sigmoid", norm_topk_prob=False),
    "shared_always": dict(router="softmax", norm_topk_prob=True, d_shared=8),
    "shared_gated": dict(router="softmax", norm_topk_prob=False, d_shared=8,
                         shared_expert_gated=True),
}


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_matches_per_token_loop_dense_and_ragged(kind, x):
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, **LAYERS[kind])
    p = layer_params(moe, x)
    want = loop_reference(moe, p, x)
    dense = np.asarray(jax.jit(moe.apply)({"params": p}, x))
    ragged = np.asarray(jax.jit(moe.clone(impl="ragged").apply)({"params": p}, x))
    np.testing.assert_allclose(dense, want, atol=1e-5)
    np.testing.assert_allclose(ragged, want, atol=1e-5)


def test_routing_weights(x):
    logits = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, E)) * 2
    probs, w, idx = route(logits, K, "softmax", norm_topk_prob=False)
    ref = np.exp(np.asarray(logits))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, ref, rtol=1e-6)
    np.testing.assert_array_equal(idx, np.argsort(-ref, axis=-1)[..., :K])
    np.testing.assert_allclose(w, np.take_along_axis(ref, np.asarray(idx), -1), rtol=1e-6)
    _, w_norm, _ = route(logits, K, "softmax", norm_topk_prob=True)
    np.testing.assert_allclose(np.asarray(w_norm).sum(-1), 1.0, rtol=1e-6)
    probs_sig, _, _ = route(logits, K, "sigmoid")
    np.testing.assert_allclose(probs_sig, 1 / (1 + np.exp(-np.asarray(logits))), rtol=1e-6)

    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, norm_topk_prob=True)
    p = layer_params(moe, x)
    _, sites = mi.capture(moe, p, x)
    weights = np.asarray(sites["moe.weights"])
    assert weights.shape == (BATCH, LENGTH, E)
    assert ((weights > 0).sum(-1) == K).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sites["moe.router_probs"]).sum(-1), 1.0, rtol=1e-6)
    expert_out = np.asarray(sites["moe.expert_out"])
    assert expert_out.shape == (BATCH, LENGTH, E, D)
    np.testing.assert_array_equal(np.abs(expert_out).sum(-1) > 0, weights > 0)


def test_aux_losses_match_hand_computation(x):
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, aux_loss_coef=0.01,
              z_loss_coef=0.001)
    p = layer_params(moe, x)
    _, mutated = jax.jit(lambda p, x: moe.apply({"params": p}, x,
                                                 mutable=[AUX_LOSS, "intermediates"]))(p, x)
    logits = np.asarray(mutated["intermediates"]["moe.router_logits"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., :K].reshape(-1, K)
    counts = np.zeros(E)
    for row in top:
        counts[row] += 1
    f = counts / top.shape[0]
    balance = 0.01 * E * np.sum(f * probs.reshape(-1, E).mean(0))
    lse = np.log(np.exp(logits).sum(-1))
    zl = 0.001 * np.mean(lse ** 2)
    got = mutated[AUX_LOSS]
    np.testing.assert_allclose(got["moe_balance_loss"][0], balance, rtol=1e-5)
    np.testing.assert_allclose(got["moe_router_z_loss"][0], zl, rtol=1e-5)
    # no aux collection work unless asked: coefficient 0 sows nothing
    _, none = moe.clone(aux_loss_coef=0.0, z_loss_coef=0.0).apply(
        {"params": p}, x, mutable=[AUX_LOSS])
    assert not none.get(AUX_LOSS)
    assert AUX_LOSS == TRAIN_AUX_LOSS


def test_balance_loss_matches_transformers():
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = np.random.default_rng(0).standard_normal((BATCH * LENGTH, E)).astype(np.float32)
    probs, _, idx = route(jnp.asarray(logits), K)
    ours = float(balance_loss(probs, idx, E))
    theirs = float(mixtral.load_balancing_loss_func((torch.tensor(logits),), E, K))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert float(z_loss(jnp.zeros((3, E)))) == pytest.approx(np.log(E) ** 2, rel=1e-6)


@pytest.mark.parametrize("kind", ["softmax_raw", "shared_gated"])
def test_zeroing_an_expert_equals_removing_it(kind, x):
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, **LAYERS[kind])
    p = layer_params(moe, x)
    _, sites = mi.capture(moe, p, x, sites=["moe.weights"])
    # the expert most often selected, so the ablation changes something
    j = int(np.argmax((np.asarray(sites["moe.weights"]) > 0).sum((0, 1))))
    onehot = (jnp.arange(E) == j).astype(jnp.float32)
    via_weights = mi.intervene(moe, p, x, interventions={
        "moe.weights": mi.Intervention.zero(mask=onehot)})
    via_out = mi.intervene(moe, p, x, interventions={
        "moe.expert_out": mi.Intervention.zero(mask=onehot[:, None])})
    want = loop_reference(moe, p, x, drop=(j,))
    np.testing.assert_allclose(via_weights, want, atol=1e-5)
    np.testing.assert_allclose(via_out, want, atol=1e-5)
    assert np.abs(np.asarray(via_weights) - loop_reference(moe, p, x)).max() > 1e-3


def test_forcing_a_routing_runs_an_unselected_expert(x):
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, impl="ragged")
    p = layer_params(moe, x)
    forced = jnp.zeros((E,)).at[0].set(1.0)  # every token to expert 0 only
    out = mi.intervene(moe, p, x, interventions={"moe.weights": mi.Intervention.patch(forced)})
    pn = jax.tree.map(np.asarray, p)
    xn = np.asarray(x)
    want = (silu(xn @ pn["gate"][0]) * (xn @ pn["up"][0])) @ pn["down"][0]
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_topk_sites_and_expert_inputs(x):
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, norm_topk_prob=True)
    p = layer_params(moe, x)
    plain, sites = mi.capture(moe, p, x)
    _, want_w, want_i = route(sites["moe.router_logits"], K, norm_topk_prob=True)
    np.testing.assert_array_equal(sites["moe.topk_indices"], want_i)
    np.testing.assert_allclose(sites["moe.topk_weights"], want_w, rtol=1e-6)
    np.testing.assert_array_equal(sites["moe.expert_in"],
                                  np.broadcast_to(np.asarray(x)[:, :, None], (BATCH, LENGTH, E, D)))
    # scaling the top-k weights by 2 doubles the routed part of the output
    doubled = mi.intervene(moe, p, x, interventions={
        "moe.topk_weights": mi.Intervention(scale=2.0)})
    np.testing.assert_allclose(doubled, 2 * np.asarray(plain), rtol=1e-5, atol=1e-6)
    pn, xn = jax.tree.map(np.asarray, p), np.asarray(x, np.float64)
    # patching expert 2's input with zeros-plus-ones changes only expert 2's write
    ones = jnp.ones((E, D))
    mask = (jnp.arange(E) == 2).astype(jnp.float32)[:, None]
    edited = mi.intervene(moe, p, x, interventions={
        "moe.expert_in": mi.Intervention.patch(ones, mask=mask)})
    h2 = (silu(np.ones(D) @ pn["gate"][2]) * (np.ones(D) @ pn["up"][2])) @ pn["down"][2]
    h2_x = (silu(xn @ pn["gate"][2]) * (xn @ pn["up"][2])) @ pn["down"][2]
    w2 = np.asarray(sites["moe.weights"])[..., 2:3]
    np.testing.assert_allclose(edited, np.asarray(plain) + w2 * (h2 - h2_x), atol=1e-5)
    assert (w2 > 0).any()


def test_layer_bad_input():
    x = jnp.zeros((1, 2, D))
    with pytest.raises(ValueError, match="top-k=7"):
        jax.eval_shape(MoE(n_experts=E, n_experts_per_tok=7, d_expert=M).init,
                       jax.random.key(0), x)
    with pytest.raises(ValueError, match="router='argmax'"):
        jax.eval_shape(MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, router="argmax").init,
                       jax.random.key(0), x)
    with pytest.raises(ValueError, match="d_shared"):
        jax.eval_shape(MoE(n_experts=E, n_experts_per_tok=K, d_expert=M,
                           shared_expert_gated=True).init, jax.random.key(0), x)


# --------------------------------------------------------------------------- decoder

CONFIG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_mlp=48, n_experts=4, n_experts_per_tok=2, d_expert=24,
                       d_shared_expert=16, shared_expert_gated=True, qkv_bias=True,
                       router_aux_loss_coef=0.01, router_z_loss_coef=0.001)


def decoder_params(model, tokens, seed=0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * noise if is_norm else 0.2 * noise)
    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


@pytest.fixture(scope="module")
def decoder():
    model = MoEDecoder(CONFIG)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, LENGTH))
    return model, decoder_params(model, tokens), tokens


def test_decoder_sites_and_axes(decoder):
    model, _, tokens = decoder
    sites = mi.list_sites(model, jax.ShapeDtypeStruct(tokens.shape, jnp.int32))
    assert set(sites) == set(MoEDecoder.SITES)
    sizes = dict(layer=CONFIG.n_layers, batch=BATCH, pos=LENGTH, query_pos=LENGTH,
                 key_pos=LENGTH, d_model=CONFIG.d_model, head=CONFIG.n_heads,
                 kv_head=CONFIG.n_kv_heads, d_head=CONFIG.d_head, expert=CONFIG.n_experts,
                 vocab=CONFIG.vocab_size, topk=CONFIG.n_experts_per_tok)
    for name, spec in MoEDecoder.SITES.items():
        assert sites[name].shape == tuple(sizes[a] for a in spec.axes), name
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    assert params["layers"]["moe"]["gate"].shape == (2, 4, 32, 24)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    assert boxed["layers"]["moe"]["gate"].names == ("layers", "experts", "embed", "mlp")


def test_decoder_class_must_fit_the_config(decoder):
    _, _, tokens = decoder
    with pytest.raises(ValueError, match="use MoEDecoder"):
        jax.eval_shape(Decoder(CONFIG).init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="n_experts_per_tok=5"):
        DecoderConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_experts=4,
                      n_experts_per_tok=5)
    with pytest.raises(ValueError, match="shared_expert_gated"):
        DecoderConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_experts=4,
                      shared_expert_gated=True)


def test_noop_edits_are_bit_identical_and_ablations_agree(decoder):
    model, params, tokens = decoder
    plain = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    captured, sites = mi.capture(model, params, tokens,
                                 sites=["moe.expert_out", "moe.shared_out", "moe_out"])
    np.testing.assert_array_equal(captured, plain)
    noop = {name: mi.Intervention(mask=0.0)
            for name in ("moe.expert_out", "moe.weights", "moe.router_logits",
                         "moe.router_probs", "moe_out", "moe.topk_weights",
                         "moe.expert_in")}
    np.testing.assert_array_equal(mi.intervene(model, params, tokens, interventions=noop),
                                  plain)
    # (a no-op edit of moe.shared_out recompiles the layer differently on XLA CPU: ~1e-6)
    shared_noop = {"moe.shared_out": mi.Intervention(mask=0.0)}
    np.testing.assert_allclose(mi.intervene(model, params, tokens, interventions=shared_noop),
                               plain, atol=1e-5)
    # moe_out = sum of expert writes + shared expert
    np.testing.assert_allclose(sites["moe.expert_out"].sum(3) + sites["moe.shared_out"],
                               sites["moe_out"], atol=1e-5)
    # ablating expert 1 in layer 0: zero weight == zero output, and it changes the logits
    mask = np.zeros((CONFIG.n_layers, 1, 1, CONFIG.n_experts), np.float32)
    mask[0, ..., 1] = 1
    via_w = mi.intervene(model, params, tokens,
                         interventions={"moe.weights": mi.Intervention.zero(mask=mask)})
    via_out = mi.intervene(model, params, tokens, interventions={
        "moe.expert_out": mi.Intervention.zero(mask=mask[..., None])})
    np.testing.assert_allclose(via_w, via_out, atol=1e-5)
    assert np.abs(np.asarray(via_w) - plain).max() > 1e-4


def test_unrolled_and_ragged_match_scanned(decoder):
    model, params, tokens = decoder
    plain = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
    unrolled = MoEDecoder(dataclass_replace(CONFIG, scan_layers=False))
    out = jax.jit(unrolled.apply)({"params": unstack_layers(params, CONFIG.n_layers)}, tokens)
    # XLA compiles the expert einsums differently inside the scan: equal to float rounding
    np.testing.assert_allclose(out, plain, atol=1e-5)
    ragged = MoEDecoder(dataclass_replace(CONFIG, moe_impl="ragged"))
    np.testing.assert_allclose(jax.jit(ragged.apply)({"params": params}, tokens), plain,
                               atol=1e-5)


def test_decoder_capacity_jitter_and_dit_loss_reach_the_layer(decoder):
    _, params, tokens = decoder
    config = dataclass_replace(CONFIG, moe_capacity_factor=0.5, router_jitter_noise=0.2,
                               router_balance_loss_form="dit", router_z_loss_coef=0.0,
                               moe_router_impl="fused")
    model = MoEDecoder(config)
    _, sites = mi.capture(model, params, tokens, sites=["moe.router_logits", "moe.weights"])
    n_tokens = BATCH * LENGTH
    capacity = expert_capacity(n_tokens, CONFIG.n_experts, CONFIG.n_experts_per_tok, 0.5)
    for layer in range(CONFIG.n_layers):
        _, w, idx = route(sites["moe.router_logits"][layer], CONFIG.n_experts_per_tok)
        kept = jnp.where(capacity_keep(idx, CONFIG.n_experts, capacity), w, 0)
        np.testing.assert_allclose(sites["moe.weights"][layer],
                                   dense_weights(kept, idx, CONFIG.n_experts), rtol=1e-6)
        assert (np.asarray(sites["moe.weights"][layer]) > 0).sum(0).max() <= capacity
    _, aux = model.apply({"params": params}, tokens, mutable=[AUX_LOSS])
    want = [0.01 * balance_loss(*route(sites["moe.router_logits"][layer],
                                       CONFIG.n_experts_per_tok)[::2], CONFIG.n_experts, "dit")
            for layer in range(CONFIG.n_layers)]
    np.testing.assert_allclose(aux[AUX_LOSS]["layers"]["moe"]["moe_balance_loss"][0], want,
                               rtol=1e-5)
    # jitter only with a dropout rng (as the train step passes), per layer
    plain = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(plain, MoEDecoder(dataclass_replace(
        config, router_jitter_noise=0.0)).apply({"params": params}, tokens))
    jittered = model.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(jittered) - np.asarray(plain)).max() > 1e-5
    base = dict(vocab_size=8, d_model=8, n_layers=1, n_heads=2, d_mlp=8, n_experts=4)
    for changes, message in [({"router": "centroid"}, "centroid router needs centroids"),
                             ({"moe_capacity_factor": 0.0}, "moe_capacity_factor must be > 0"),
                             ({"moe_router_impl": "cuda"}, "moe_router_impl='cuda'"),
                             ({"router_balance_loss_form": "x"}, "router_balance_loss_form"),
                             ({"router_jitter_noise": -1.0}, "router_jitter_noise")]:
        with pytest.raises(ValueError, match=message):
            DecoderConfig(**base, **changes)


def dataclass_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_aux_losses_reach_the_train_collection_per_layer(decoder):
    model, params, tokens = decoder

    def total_aux(p):
        _, mutated = model.apply({"params": p}, tokens, mutable=[TRAIN_AUX_LOSS])
        leaves = jax.tree.leaves(mutated[TRAIN_AUX_LOSS])
        assert all(leaf.shape == (CONFIG.n_layers,) for leaf in leaves)
        return sum(jnp.sum(leaf) for leaf in leaves)

    _, sites = mi.capture(model, params, tokens, sites=["moe.router_logits"])
    value = jax.jit(total_aux)(params)
    logits = sites["moe.router_logits"]
    want = 0.0
    for layer in range(CONFIG.n_layers):
        probs, _, idx = route(logits[layer], CONFIG.n_experts_per_tok)
        want += 0.01 * balance_loss(probs, idx, CONFIG.n_experts)
        want += 0.001 * z_loss(logits[layer])
    np.testing.assert_allclose(value, want, rtol=1e-5)
    # the losses are differentiable with respect to the router (layer level, cheaper)
    moe = MoE(n_experts=E, n_experts_per_tok=K, d_expert=M, aux_loss_coef=0.01,
              z_loss_coef=0.001)
    x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, D))
    p = layer_params(moe, x)
    grads = jax.jit(jax.grad(lambda p: sum(jax.tree.leaves(
        moe.apply({"params": p}, x, mutable=[AUX_LOSS])[1]))))(p)
    assert np.abs(np.asarray(grads["router"])).max() > 0


def test_moe_site_table_in_docs_matches_declarations():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "sites.md").read_text()
    section = doc.split("## Mixture-of-experts decoder", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    documented = {n: (a.strip(), m.strip()) for n, a, m in rows}
    declared = {n: (", ".join(s.axes), s.meaning) for n, s in MoEDecoder.SITES.items()}
    assert documented == declared


# --------------------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOL = 1e-4
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
             eos_token_id=None, pad_token_id=0)
HF_FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        **SIZES, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, norm_topk_prob=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        norm_topk_prob=True, head_dim=16),
}


def randomize_(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def hf_logits(model, tokens, mask):
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def tokens_and_mask():
    tokens = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (3, 8))
    mask = np.ones((3, 8), np.int64)
    mask[1, :3] = 0
    return tokens, mask


@pytest.fixture(scope="module", params=sorted(HF_FAMILIES))
def hf_family(request, tmp_path_factory):
    config = HF_FAMILIES[request.param]()
    config._attn_implementation = "eager"
    reference = randomize_(transformers.AutoModelForCausalLM.from_config(config)).eval()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    model, params = load_hf(folder)
    return request.param, reference, folder, model, params


def test_moe_logits_match_transformers(hf_family):
    name, reference, _, model, params = hf_family
    assert isinstance(model, MoEDecoder)
    assert model.config.hf_architecture == type(reference).__name__
    tokens, mask = tokens_and_mask()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask))
    diff = np.abs(ours - hf_logits(reference, tokens, mask))[mask.astype(bool)].max()
    print(f"{name}: max |logit diff| vs transformers {diff:.2e}")
    assert diff <= TOL


def test_moe_save_hf_round_trip(hf_family, tmp_path):
    _, reference, _, model, params = hf_family
    save_hf(model, params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(reference)
    tokens, mask = tokens_and_mask()
    real = mask.astype(bool)  # the reloaded model uses sdpa attention: compare real tokens
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask)[real],
                               hf_logits(reference, tokens, mask)[real], atol=1e-5)
    model2, params2 = load_hf(tmp_path, scan_layers=False)
    assert model2.config == dataclass_replace(model.config, scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(params2), params)


def test_mixed_dense_and_moe_layers_are_refused(tmp_path):
    import json
    config = transformers.Qwen2MoeConfig(**SIZES, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40,
                                         decoder_sparse_step=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="decoder_sparse_step=2"):
        load_hf(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.update(decoder_sparse_step=1, mlp_only_layers=[1])
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        load_hf(tmp_path)
