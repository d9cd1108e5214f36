"""train/peft.py and train/importance.py on a tiny decoder, against plain references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechinterp.models import Decoder, DecoderConfig
from mechinterp.models.kernels.gating import threshold_gain_reference
from mechinterp.train import importance as imp
from mechinterp.train import peft

TARGETS = {"attn/wq$": (1, 1), "attn/wo$": (1, 2), "mlp/down$": (1, 1)}
UNITS = {"attn/wo$": 1, "mlp/down$": 1}  # heads of wo, neurons of down (layer axis 0)


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(DecoderConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2,
                                  n_kv_heads=2, d_mlp=32, qkv_bias=True))
    tokens = jax.random.randint(jax.random.key(1), (4, 7), 0, 32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
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
    for layer in range(3):
        smaller, p = model.remove_sublayers(params, [("attn", layer), ("mlp", layer)])
        ref = _loss(jax.jit(lambda q, t: smaller.apply({"params": q}, t)), tokens)(p)
        np.testing.assert_allclose(sweep[layer], ref - loss(params), atol=1e-5)


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
