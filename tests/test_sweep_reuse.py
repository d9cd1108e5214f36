"""Reuse of unchanged work in sweeps (resumed forwards), FLOP counts, and compile caching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp import metrics, patching
from mechinterp.jaxpr_flops import matmul_flops
from mechinterp.models import Decoder, DecoderConfig
from test_decoder import random_params
from toy_models import ToyModel

N_LAYERS, BATCH, SEQ, VOCAB = 2, 2, 7, 64


def random_tokens(seed):
    """Token ids from numpy (jax.random compiles a kernel per shape, ~1 s on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)


def _decoder(scan_layers=True):
    config = DecoderConfig(vocab_size=VOCAB, d_model=32, n_layers=N_LAYERS, n_heads=4,
                           n_kv_heads=2, d_mlp=48, scan_layers=scan_layers)
    return Decoder(config)


@pytest.fixture(scope="module")
def setup():
    model = _decoder()
    clean = random_tokens(0)
    corrupted = clean.at[:, 2].set((clean[:, 2] + 7) % VOCAB)
    mask = jnp.ones((BATCH, SEQ), jnp.int32).at[1, :2].set(0)  # row 1 left-padded
    params = random_params(model, clean, seed=1)
    _, cache = mi.capture(model, params, clean, mask)
    metric = metrics.logit_diff(jnp.array([1, 2]), jnp.array([4, 5]))
    return model, params, clean, corrupted, mask, cache, metric


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_resumed_forward_equals_the_full_forward(scan_layers):
    model = _decoder(scan_layers)
    tokens = random_tokens(2)
    mask = jnp.ones((BATCH, SEQ), jnp.int32).at[0, :3].set(0)
    params = random_params(model, tokens, seed=3)
    full = jax.jit(model.apply)({"params": params}, tokens, mask)
    state = model.resume_state(params, tokens, mask)
    for first_layer, first_pos in [(0, 0), (1, 3), (N_LAYERS - 1, SEQ - 1)]:
        tail, tail_params, kwargs = model.resume(params, state, first_layer, first_pos)
        assert tail.config.n_layers == N_LAYERS - first_layer
        out = jax.jit(lambda p, kw, tail=tail: tail.apply({"params": p}, None, **kw))(
            tail_params, kwargs)
        np.testing.assert_allclose(out, full[:, first_pos:], atol=2e-6)


def test_resume_rejects_layers_and_positions_out_of_range(setup):
    model, params, clean, *_ = setup
    state = model.resume_state(params, clean)
    with pytest.raises(ValueError, match="first_layer=2"):
        model.resume(params, state, N_LAYERS, 0)
    with pytest.raises(ValueError, match="first_pos=7"):
        model.resume(params, state, 0, SEQ)


@pytest.mark.parametrize(
    "name",
    ["get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_k_by_pos",
     "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_mlp_neuron"],
)
def test_reuse_gives_the_same_grid_with_less_work(setup, name):
    model, params, _, corrupted, mask, cache, metric = setup
    kwargs = dict(progress=False, model_kwargs={"attention_mask": mask})
    plain = getattr(patching, name)(model, params, corrupted, cache, metric, reuse=False,
                                    **kwargs)
    reused = getattr(patching, name)(model, params, corrupted, cache, metric, reuse=True,
                                     position_blocks=2, **kwargs)
    np.testing.assert_allclose(reused.values, plain.values, atol=2e-6)
    assert np.ptp(plain.values) > 1e-4  # the grid is not flat, so agreement means something
    assert plain.cost["groups"] == 1 and reused.cost["groups"] > 1
    assert reused.cost["flops"] < plain.cost["flops"] < plain.cost["naive_flops"]


def test_reuse_with_a_metric_on_full_logits(setup):
    """A plain callable needs every position's logits: reuse skips layers, not positions."""
    model, params, _, corrupted, _, cache, _ = setup

    def last_logit_diff(logits):
        return (logits[:, -1, 1] - logits[:, -1, 4]).mean()

    plain = patching.get_act_patch_resid_pre(model, params, corrupted, cache, last_logit_diff,
                                             progress=False, reuse=False)
    reused = patching.get_act_patch_resid_pre(model, params, corrupted, cache, last_logit_diff,
                                              progress=False, reuse=True)
    np.testing.assert_allclose(reused.values, plain.values, atol=2e-6)
    assert reused.cost["groups"] == N_LAYERS


def test_executed_flops_are_one_selected_logit_forward_per_cell(setup):
    model, params, _, corrupted, _, cache, metric = setup
    cells = N_LAYERS * SEQ
    result = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                              progress=False, reuse=False, chunk_size=cells)
    positions, columns = metric.positions(BATCH, SEQ), metric.columns(BATCH)
    one = matmul_flops(lambda p, t: model.apply({"params": p}, t, logit_positions=positions,
                                                logit_columns=columns), params, corrupted)
    full = matmul_flops(lambda p, t: model.apply({"params": p}, t), params, corrupted)
    assert result.cost == dict(flops=cells * one, naive_flops=cells * full, groups=1)
    assert one < full


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_logit_columns_give_the_metric_on_full_logits(tie_embeddings):
    config = DecoderConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_mlp=48,
                           tie_embeddings=tie_embeddings)
    model = Decoder(config)
    tokens = random_tokens(4)
    params = random_params(model, tokens, seed=5)
    metric = metrics.logit_diff(jnp.array([3, 9]), 11, pos=jnp.array([2, SEQ - 1]),
                                reduce="none")
    apply = jax.jit(model.apply)
    selected = apply({"params": params}, tokens, logit_positions=metric.positions(
        BATCH, SEQ), logit_columns=metric.columns(BATCH))
    assert selected.shape == (BATCH, 1, 2)
    full = apply({"params": params}, tokens)
    np.testing.assert_allclose(metric.on_columns(selected), metric(full), atol=1e-5)


def test_a_repeated_sweep_does_not_recompile(setup):
    model, params, _, corrupted, _, cache, metric = setup
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric, progress=False)
    other_tokens = jnp.array(np.asarray(corrupted))  # a new array, a new metric instance
    other_metric = metrics.logit_diff(jnp.array([7, 8]), jnp.array([9, 10]))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        patching.get_act_patch_resid_pre(model, params, other_tokens, cache, other_metric,
                                         progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []


def test_metrics_are_pytrees_that_jit_as_arguments():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 11)), jnp.float32)
    metric = metrics.logit_diff(jnp.array([1, 2]), jnp.array([3, 4]), pos=1)
    leaves = jax.tree.leaves(metric)
    assert len(leaves) == 3  # pos, correct_ids, incorrect_ids; reduce is static
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(metric, logits), metric(logits))


def test_reuse_errors():
    model = ToyModel()
    x = jnp.ones((2, 4))
    params = random_params(model, x)
    _, cache = mi.capture(model, params, x, sites=["resid_pre"])
    with pytest.raises(ValueError, match="no resume protocol"):
        mi.sweep.sweep(model, params, (x,), "resid_pre", ("layer",), cache["resid_pre"],
                       lambda out: out.mean(), reuse=True, progress=False)
    with pytest.raises(ValueError, match="position_blocks"):
        mi.sweep.sweep(model, params, (x,), "resid_pre", ("layer",), cache["resid_pre"],
                       lambda out: out.mean(), position_blocks=0, progress=False)


def test_matmul_flops_counts_scans_vmaps_and_conds():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert matmul_flops(jnp.matmul, a, b) == 2 * 4 * 8 * 16

    def layers(x, ws):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]

    ws = jnp.ones((5, 8, 8))
    assert matmul_flops(jax.jit(layers), a, ws) == 5 * 2 * 4 * 8 * 8
    assert matmul_flops(jax.vmap(layers, (0, None)), jnp.ones((3, 4, 8)), ws) == 3 * 5 * 512

    def branch(flag, x):
        return jax.lax.cond(flag, lambda x: x @ b @ b.T, lambda x: x @ b[:, :1] @ b[:, :1].T, x)

    assert matmul_flops(branch, True, a) == 2 * (2 * 4 * 8 * 16)
