"""train/peft.py and train/importance.py on tiny decoders against plain references; ADEPT's
expansion and unit learning rates, CoFiTune's masks, and what the smoke runs of
configs/adept.py, cofitune.py and dopamine.py report."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechinterp.experiments.adept import method
from mechinterp.experiments.cofitune import gradient_masks
from mechinterp.models import Decoder, DecoderConfig
from mechinterp.models.kernels.gating import threshold_gain_reference
from mechinterp.train import importance as imp
from mechinterp.train import optim, peft

TARGETS = {"attn/wq$": (1, 1), "attn/wo$": (1, 2), "mlp/down$": (1, 1)}
UNITS = {"attn/wo$": 1, "mlp/down$": 1}  # heads of wo, neurons of down (layer axis 0)


def random_params(model, tokens, seed=0):
    """Parameters of ``model`` without running its initializers (eager init compiles every
    random initializer): N(0, 0.3) entries in the shapes ``eval_shape`` gives."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(DecoderConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2,
                                  n_kv_heads=2, d_mlp=32, qkv_bias=True))
    tokens = jax.random.randint(jax.random.key(1), (4, 7), 0, 32)
    params = random_params(model, tokens)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return model, params, tokens, apply


def _loss(apply, tokens):
    def loss(p):
        logits = apply(p, tokens)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss


def test_lora_merged_equals_unmerged_and_reference(tiny):
    model, params, tokens, apply = tiny
    adapter = peft.lora_init(params, TARGETS, rank=2, key=jax.random.key(2))
    np.testing.assert_array_equal(apply(peft.lora_params(params, adapter), tokens),
                                  apply(params, tokens))  # B = 0: starts as the base
    adapter = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape),
                           adapter)
    unmerged = jax.jit(lambda p, a, t: model.apply({"params": peft.lora_params(p, a, 4.0)},
                                                   t))(params, adapter, tokens)
    merged = peft.merge(params, adapter, 4.0)
    np.testing.assert_allclose(apply(merged, tokens), unmerged, atol=1e-5, rtol=1e-5)
    # the merged wo against float64 numpy: W + (alpha / r) A B, reshaped (heads, d, model)
    ab = adapter["layers"]["attn"]["wo"]
    w = np.asarray(params["layers"]["attn"]["wo"], np.float64)
    ref = w + 2.0 * np.einsum("lir,lro->lio", np.asarray(ab["a"], np.float64),
                              np.asarray(ab["b"], np.float64)).reshape(w.shape)
    np.testing.assert_allclose(merged["layers"]["attn"]["wo"], ref, atol=1e-6)
    back = peft.unmerge(merged, adapter, 4.0)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="match no parameter"):
        peft.lora_init(params, {"nope$": (0, 1)}, 2, jax.random.key(0))


def test_peft_optimizer_moves_only_trainable_and_checkpoints_them(tiny, tmp_path):
    _, params, tokens, apply = tiny
    patterns = peft.bias_patterns(params)
    assert patterns == [r"(^|/)b[qkv]$"]
    tx = peft.peft_optimizer(optax.adam(1e-2), patterns)
    state = tx.init(params)
    adam_leaves = sum(x.size for x in jax.tree.leaves(state))
    part = peft.trainable_part(params, patterns)
    assert adam_leaves == 2 * sum(x.size for x in jax.tree.leaves(part)) + 1  # mu, nu, count
    grads = jax.grad(_loss(apply, tokens))(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    mask = peft.trainable_mask(params, patterns)
    for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(new), jax.tree.leaves(params)):
        assert (not np.array_equal(a, b)) if m else np.array_equal(a, b)
    saved = peft.trainable_part(new, patterns)
    peft.save_trainable(tmp_path / "adapter", saved, step=1)
    back = peft.restore_trainable(tmp_path / "adapter", saved)
    restored = peft.with_part(params, back)
    np.testing.assert_array_equal(apply(restored, tokens), apply(new, tokens))
    assert 0 < peft.trainable_fraction(params, saved) < 0.05


def test_threshold_gate_matches_kernel_reference():
    h = jax.random.normal(jax.random.key(0), (5, 6))
    gain = jnp.linspace(0.5, 2.0, 6)
    np.testing.assert_allclose(peft.threshold_gate(h, 0.3, gain, 0.5),
                               threshold_gain_reference(jnp.broadcast_to(gain, h.shape), h,
                                                        0.3, 0.5), rtol=1e-6)
    tau = jnp.linspace(-0.5, 0.5, 6)
    hn = np.asarray(h, np.float64)
    ref = np.asarray(gain) * hn / (1 + np.exp(-(hn - np.asarray(tau)) / 0.5))
    np.testing.assert_allclose(peft.threshold_gate(h, tau, gain, 0.5), ref, rtol=1e-5)
    hard = peft.threshold_gate(h, tau, gain, hard=True)
    np.testing.assert_array_equal(hard, np.where(hn > np.asarray(tau), gain * h, 0.0))


def test_layer_masking_sweep_equals_removing_the_layer(tiny):
    model, params, tokens, apply = tiny
    loss = _loss(apply, tokens)
    masks = imp.ones_masks(params, UNITS)
    assert masks["layers/attn/wo"].shape == (3, 2) and masks["layers/mlp/down"].shape == (3, 32)
    sweep = imp.masking_sweep(loss, params, imp.layer_masks(masks))
    assert sweep.shape == (3,)
    smaller, p = model.remove_sublayers(params, [("attn", 1), ("mlp", 1)])
    ref = _loss(jax.jit(lambda q, t: smaller.apply({"params": q}, t)), tokens)(p)
    np.testing.assert_allclose(sweep[1], ref - loss(params), atol=1e-5)


def test_mask_gradient_is_summed_grad_times_theta(tiny):
    _, params, tokens, apply = tiny
    loss = _loss(apply, tokens)
    masks = imp.ones_masks(params, UNITS)
    g = imp.mask_gradient(lambda p, m: loss(p), params, masks)
    full = jax.grad(loss)(params)
    down, gdown = params["layers"]["mlp"]["down"], full["layers"]["mlp"]["down"]
    np.testing.assert_allclose(g["layers/mlp/down"], jnp.abs((down * gdown).sum(-1)),
                               rtol=1e-4, atol=1e-7)
    gxt = imp.grad_x_theta(loss, params, UNITS)
    np.testing.assert_allclose(gxt["layers/mlp/down"], jnp.abs(down * gdown).sum(-1),
                               rtol=1e-4, atol=1e-7)
    # finite difference of one neuron's mask
    sweep = imp.masking_sweep(loss, params, imp.unit_masks(masks, "layers/attn/wo"))
    assert sweep.shape == (6,) and np.isfinite(sweep).all()
    # self-KL between two dropout passes: zero without dropout, positive with it
    kl = imp.self_kl(apply(params, tokens), apply(params, tokens))
    assert abs(float(kl)) < 1e-6
    noisy = imp.apply_masks(params, imp.dropout_masks(jax.random.key(0), masks, 0.5))
    assert float(imp.self_kl(apply(params, tokens), apply(noisy, tokens))) > 1e-4


def test_expanded_decoder_starts_as_the_base_and_trains_only_the_copies():
    model = Decoder(DecoderConfig(vocab_size=24, d_model=16, n_layers=3, n_heads=2,
                                  n_kv_heads=2, d_mlp=16))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 24)
    params = random_params(model, tokens)
    big, expanded, copies = method.expand(model, params, [0, 2])
    assert copies == [1, 4] and big.config.n_layers == 5 and not big.config.scan_layers
    np.testing.assert_allclose(big.apply({"params": expanded}, tokens),
                               model.apply({"params": params}, tokens), atol=1e-5, rtol=1e-5)
    # the copy is the layer it copies except the zeroed output projections
    np.testing.assert_array_equal(expanded["layers_4"]["attn"]["wq"],
                                  params["layers"]["attn"]["wq"][2])
    assert not np.any(expanded["layers_1"]["mlp"]["down"])
    part = peft.trainable_part(expanded, method.copy_patterns(copies))
    assert sorted(part) == ["layers_1", "layers_4"]
    with pytest.raises(ValueError, match="distinct"):
        method.expand(model, params, [3])
    # decoupled LRs: 2 (I_max - I) / (I_max - I_min); the most important unit gets 0
    scores = {"layers_1/heads": np.array([1.0, 3.0]), "layers_1/neurons": np.linspace(1, 2, 16),
              "layers_4/heads": np.array([2.0, 2.0]), "layers_4/neurons": np.ones(16)}
    mult = method.unit_multipliers(scores, expanded)
    np.testing.assert_allclose(mult["^layers_1/attn/wq$"].ravel(), [2.0, 0.0])
    np.testing.assert_allclose(mult["^layers_1/attn/wo$"].ravel(), [2.0, 0.0])
    np.testing.assert_allclose(mult["^layers_1/mlp/down$"].ravel(),
                               2 * (3 - np.linspace(1, 2, 16)) / 2)
    tx = peft.peft_optimizer(optax.chain(optax.sgd(1.0), optim.scale_by_multipliers(
        method.initial_multipliers(expanded, copies))), method.copy_patterns(copies))
    state = optim.set_multipliers(tx.init(expanded), mult)  # shapes fit the state
    grads = jax.tree.map(jnp.ones_like, expanded)
    updates, _ = tx.update(grads, state, expanded)
    np.testing.assert_allclose(updates["layers_1"]["attn"]["wq"][:, 1], 0.0)
    np.testing.assert_allclose(updates["layers_1"]["attn"]["wq"][:, 0], -2.0)
    assert not np.any(updates["layers_0"]["attn"]["wq"])


def test_cofitune_masks_fit_one_state_and_soft_mask_units():
    model = Decoder(DecoderConfig(vocab_size=24, d_model=16, n_layers=4, n_heads=2,
                                  n_kv_heads=2, d_mlp=8))
    params = random_params(model, jnp.zeros((1, 4), jnp.int32))
    tx = optim.make_optimizer("adamw", 1e-3, gradient_masks=gradient_masks(params, (0, 1),
                                                                           "both"))
    state = tx.init(params)
    soft = {"heads": np.full((4, 2), 0.25), "neurons": np.tile(np.linspace(0, 1, 8), (4, 1))}
    for module in ("attn", "mlp", "both"):
        masks = gradient_masks(params, (2, 4), module, soft)
        optim.set_gradient_masks(state, masks)  # same shapes for every choice
    m = gradient_masks(params, (2, 4), "mlp", soft)
    assert not m["^layers/attn/wq$"].any() and not m["^embedding$"].any()
    np.testing.assert_allclose(m["^layers/mlp/down$"][:2], 0.0)
    np.testing.assert_allclose(m["^layers/mlp/down$"][3, :, 0], 1 - np.linspace(0, 1, 8))
    np.testing.assert_allclose(gradient_masks(params, (2, 4), "attn", soft)
                               ["^layers/attn/wo$"][2], 0.75)


def _results(smoke_run, name):
    return json.loads((smoke_run(name) / "results.json").read_text())


def test_adept_smoke_copies_are_identity_before_tuning(smoke_run):
    seed = _results(smoke_run, "adept")["per_seed"][0]
    before = seed["adept"]["ablation_before"]  # the copy is an identity: no effect
    np.testing.assert_allclose(before["domain"] + before["general"], 0.0, atol=1e-6)
    assert seed["adept"]["ablation_after"]["domain"][0] != 0.0
    for m in ("full", "lora", "expand", "adept"):
        assert 0 < seed[m]["trainable"] <= 1 and math.isfinite(seed[m]["domain"]["loss"])
    assert seed["full"]["trainable"] == 1.0 and seed["lora"]["trainable"] < 1
    assert len(seed["full"]["revert_domain"]) == 2


def test_cofitune_smoke_picks_from_its_grid(smoke_run):
    seed = _results(smoke_run, "cofitune")["per_seed"][0]
    assert {"layers": seed["best"]["layers"], "module": seed["best"]["module"]} in [
        {"layers": g["layers"], "module": g["module"]} for g in seed["grid"]]
    for m in ("full", "coarse", "cofitune"):
        assert 0 <= seed[m]["domain"]["exact"] <= 1 and len(seed[m]["revert_domain"]) == 2
    assert all(0 <= v <= 1 for v in seed["importance_mean"]["neurons"])


def test_dopamine_smoke_counts_gates_and_parameters(smoke_run):
    seed = _results(smoke_run, "dopamine")["per_seed"][0]
    assert seed["gates"]["trainable_params"] == 2 * (16 + 16)  # tau and gain per neuron
    assert seed["frozen"]["trainable_params"] == 0 and seed["full"]["trainable"] == 1.0
    assert seed["bias"]["trainable_params"] == 16 + 16 + 10
    for m in seed.values():
        assert 0 <= m["rotated"] <= 1 and 0 <= m["open_gates"] <= 1


def test_token_perplexity_matches_float64_reference():
    from mechinterp.experiments.kit.domain_text import TEXTS, token_perplexity

    table = np.random.default_rng(0).normal(size=(11, 11))  # logits = a bigram table
    tokens = np.random.default_rng(1).integers(0, 11, 25)
    got = token_perplexity(lambda rows: jnp.asarray(table)[rows], tokens, window=6)
    rows = tokens[:24].reshape(4, 6)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    ref = np.exp(-np.mean([logp[a, b] for r in rows for a, b in zip(r[:-1], r[1:])]))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="window"):
        token_perplexity(lambda rows: rows, tokens[:3], window=6)
    assert set(TEXTS) == {"general", "domain"}
