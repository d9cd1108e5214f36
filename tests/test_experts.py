"""Expert usage statistics, expert patching grids, expert ablation and forced routing
(mechinterp.experts) on hand-built routings and a tiny MoE decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import DecoderConfig, MoEDecoder

import mechinterp as mi
from mechinterp.experts import (
    ablate_experts,
    expert_usage,
    force_routing,
    get_act_patch_expert_out,
    get_act_patch_expert_out_by_pos,
    usage_from_weights,
)


def test_usage_from_hand_built_weights():
    # 1 layer, batch 2, 3 positions, 3 experts; top-1 routing except one padded token
    weights = np.zeros((1, 2, 3, 3))
    weights[0, 0, 0, 0] = 0.5     # token 7 -> expert 0
    weights[0, 0, 1, 1] = 1.0     # token 8 -> expert 1
    weights[0, 0, 2, 0] = 0.7     # token 7 -> expert 0
    weights[0, 1, 0, 1] = 0.2     # token 8 -> expert 1
    weights[0, 1, 1, 0] = 0.9     # token 7 -> expert 0
    weights[0, 1, 2, 2] = 0.4     # padding: never counted
    tokens = np.array([[7, 8, 7], [8, 7, 9]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    usage = usage_from_weights(weights, tokens, mask)
    np.testing.assert_allclose(usage.fraction, [[3 / 5, 2 / 5, 0.0]])
    np.testing.assert_allclose(usage.mean_weight[0, :2], [(0.5 + 0.7 + 0.9) / 3, 0.6])
    assert np.isnan(usage.mean_weight[0, 2])                  # expert 2: only on padding
    np.testing.assert_allclose(usage.by_position[0], [[0.5, 0.5, 0], [0.5, 0.5, 0],
                                                      [1, 0, 0]])
    np.testing.assert_array_equal(usage.token_ids, [7, 8])    # 9 is padding only
    np.testing.assert_allclose(usage.by_token[:, 0], [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="layer, batch, pos, expert"):
        usage_from_weights(weights[0])


CONFIG = DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                       d_mlp=16, n_experts=4, n_experts_per_tok=2, d_expert=12)


@pytest.fixture(scope="module")
def moe_model():
    model = MoEDecoder(CONFIG)
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 5)))
    corrupted = clean.at[:, 1].set((clean[:, 1] + 3) % CONFIG.vocab_size)
    return model, random_params(model, clean), clean, corrupted


def random_params(model, tokens, seed=0):
    """Normal(0, 0.3) weights (norm scales near 1) without compiling ``model.init``."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * noise if is_norm else 0.3 * noise)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def last_logit(logits):
    return logits[:, -1, 3].mean()


def test_expert_usage_counts_the_routing(moe_model):
    model, params, clean, _ = moe_model
    usage = expert_usage(model, params, clean)
    _, sites = mi.capture(model, params, clean, sites=["moe.weights"])
    routed = np.asarray(sites["moe.weights"]) > 0
    np.testing.assert_allclose(usage.fraction, routed.mean((1, 2)))
    np.testing.assert_allclose(usage.fraction.sum(-1), CONFIG.n_experts_per_tok)
    assert usage.by_position.shape == (2, 5, 4)
    assert usage.by_token.shape == (len(np.unique(clean)), 2, 4)


def test_expert_patching_grids_match_single_interventions(moe_model):
    model, params, clean, corrupted = moe_model
    _, cache = mi.capture(model, params, clean, sites=["moe.expert_out"])
    grid = get_act_patch_expert_out(model, params, corrupted, cache, last_logit,
                                    progress=False)
    assert grid.axes == ("layer", "expert") and grid.shape == (2, 4)
    clean_out = np.asarray(cache["moe.expert_out"])
    want = np.zeros((2, 4))
    for layer in range(2):
        for expert in range(4):
            mask = np.zeros((2, 1, 1, 4, 1), np.float32)
            mask[layer, ..., expert, :] = 1
            logits = mi.intervene(model, params, corrupted, interventions={
                "moe.expert_out": mi.Intervention.patch(clean_out, mask=mask)})
            want[layer, expert] = last_logit(logits)
    np.testing.assert_allclose(np.asarray(grid), want, rtol=1e-5, atol=1e-5)
    assert np.ptp(want) > 1e-4                                # the cells differ
    by_pos = get_act_patch_expert_out_by_pos(model, params, corrupted, cache, last_logit,
                                             progress=False)
    assert by_pos.axes == ("layer", "pos", "expert") and by_pos.shape == (2, 5, 4)
    # positions before the corrupted one are identical in both runs: patching them is a no-op
    base = float(last_logit(mi.intervene(model, params, corrupted, interventions={})))
    np.testing.assert_allclose(np.asarray(by_pos)[:, 0], base, rtol=1e-5, atol=1e-5)


def test_ablation_and_forced_routing(moe_model):
    model, params, clean, _ = moe_model
    ablated = ablate_experts(model, params, clean, [(0, 1), (1, 3)])
    mask = np.zeros((2, 1, 1, 4), np.float32)
    mask[0, ..., 1] = mask[1, ..., 3] = 1
    want = mi.intervene(model, params, clean, interventions={
        "moe.weights": mi.Intervention.zero(mask=mask)})
    np.testing.assert_array_equal(ablated, want)
    forced = force_routing(model, params, clean, 1, {2: 1.0})
    # the forced run's expert writes: layer 0 as in the plain run, layer 1 only expert 2
    mask = np.array([0, 1.0], np.float32)[:, None, None, None]
    logits, sites = mi.capture(model, params, clean, sites=["moe.expert_out"], interventions={
        "moe.weights": mi.Intervention.patch(jnp.array([0, 0, 1.0, 0]), mask=mask)})
    _, plain = mi.capture(model, params, clean, sites=["moe.expert_out"])
    np.testing.assert_array_equal(forced, logits)
    written = np.abs(np.asarray(sites["moe.expert_out"])).sum(-1)        # (layer, b, pos, e)
    np.testing.assert_array_equal(sites["moe.expert_out"][0], plain["moe.expert_out"][0])
    assert (written[1, ..., [0, 1, 3]] == 0).all() and (written[1, ..., 2] > 0).all()
    with pytest.raises(ValueError, match=r"expert 4 does not exist in layer 0: it has 4"):
        ablate_experts(model, params, clean, [(0, 4)])
    with pytest.raises(ValueError, match=r"layer 2 does not exist: the model has 2"):
        ablate_experts(model, params, clean, [(2, 0)])
    with pytest.raises(ValueError, match=r"expert -1 does not exist"):
        force_routing(model, params, clean, 0, {-1: 1.0})
    with pytest.raises(ValueError, match=r"layer 5 does not exist"):
        force_routing(model, params, clean, 5, {})
