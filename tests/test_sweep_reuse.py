"""Reuse of unchanged work in sweeps (resumed forwards), FLOP counts, and compile caching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp as mi
from mechinterp import metrics, patching
from mechinterp.jaxpr_flops import matmul_flops
from mechinterp.models import Decoder, DecoderConfig, MoEDecoder
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


class CompileCounter:
    """Counts XLA backend compilations (JAX's own monitoring events) while active."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        self.count += event == "/jax/core/compile/backend_compile_duration"

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_resumed_forward_equals_the_full_forward(scan_layers):
    """One compilation serves every start layer (traced), and skipped layers cost nothing."""
    model = _decoder(scan_layers)
    tokens = random_tokens(2)
    mask = jnp.ones((BATCH, SEQ), jnp.int32).at[0, :3].set(0)
    params = random_params(model, tokens, seed=3)
    full = jax.jit(model.apply)({"params": params}, tokens, mask)
    state = model.resume_state(params, tokens, mask)

    def resumed(params, state, first_layer, first_pos=3):
        tail, tail_params, kwargs = model.resume(params, state, first_layer, first_pos)
        return tail.apply({"params": tail_params}, None, **kwargs)

    run, expected = jax.jit(resumed), np.asarray(full)[:, 3:]
    with CompileCounter() as compiles:
        for first_layer in range(N_LAYERS):
            np.testing.assert_allclose(run(params, state, np.int32(first_layer)), expected,
                                       atol=2e-6)
    assert compiles.count == 1
    np.testing.assert_allclose(resumed(params, state, N_LAYERS - 1, SEQ - 1), full[:, -1:],
                               atol=2e-6)
    every = matmul_flops(resumed, params, state, jnp.int32(0))
    skipped = matmul_flops(resumed, params, state, jnp.int32(0), cond="min")
    assert skipped * 3 < every  # the cond skips a layer's matmuls: all but the unembedding


def test_resume_rejects_layers_and_positions_out_of_range(setup):
    model, params, clean, *_ = setup
    state = model.resume_state(params, clean)
    with pytest.raises(ValueError, match="first_layer=2"):
        model.resume(params, state, N_LAYERS, 0)
    with pytest.raises(ValueError, match="first_pos=7"):
        model.resume(params, state, 0, SEQ)
    with pytest.raises(ValueError, match="first_layer= skips layers, so it needs residual="):
        model.apply({"params": params}, clean, first_layer=1)


GRIDS = ["get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos",
         "get_act_patch_attn_head_out_by_pos", "get_act_patch_mlp_out",
         "get_act_patch_attn_head_pattern_dest_src_pos"]


@pytest.mark.parametrize("name", GRIDS)
def test_reuse_gives_the_same_grid_with_less_work(setup, name):
    model, params, _, corrupted, mask, cache, metric = setup
    kwargs = dict(progress=False, model_kwargs={"attention_mask": mask},
                  skip_unchanged=False)  # every cell runs: reuse alone is measured
    plain = getattr(patching, name)(model, params, corrupted, cache, metric, reuse=False,
                                    **kwargs)
    reused = getattr(patching, name)(model, params, corrupted, cache, metric, chunk_size=4,
                                     position_blocks=2, **kwargs)  # reuse by default
    np.testing.assert_allclose(reused.values, plain.values, atol=1e-5)
    assert np.ptp(plain.values) > 1e-4  # the grid is not flat, so agreement means something
    by_pos = any(axis in ("pos", "query_pos") for axis in plain.axes)
    assert plain.cost["groups"] == 1 and reused.cost["groups"] == (2 if by_pos else 1)
    assert reused.cost["flops"] < plain.cost["flops"] < plain.cost["naive_flops"]


@pytest.mark.parametrize("family", ["unrolled", "moe"])
def test_reuse_with_unrolled_layers_and_experts(family):
    config = DecoderConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_mlp=24,
                           scan_layers=family != "unrolled")
    model = (Decoder(config) if family == "unrolled" else MoEDecoder(dataclasses.replace(
        config, n_experts=4, n_experts_per_tok=2, d_expert=16)))
    clean = random_tokens(5)
    corrupted = clean.at[:, 3].set((clean[:, 3] + 5) % VOCAB)
    params = random_params(model, clean, seed=6)
    _, cache = mi.capture(model, params, clean, sites=["attn.z"])
    metric = metrics.logit_diff(jnp.array([1, 2]), jnp.array([4, 5]))
    grid = patching.get_act_patch_attn_head_out_by_pos
    plain = grid(model, params, corrupted, cache, metric, reuse=False, progress=False)
    reused = grid(model, params, corrupted, cache, metric, reuse=True, position_blocks=2,
                  progress=False)
    np.testing.assert_allclose(reused.values, plain.values, atol=1e-5)
    assert np.ptp(plain.values) > 1e-4
    assert reused.cost["flops"] < plain.cost["flops"]


def test_compilations_do_not_grow_with_layers_or_positions():
    """A reused grid compiles the resume state's forward and one cell function per window of
    positions, whatever the number of layers and positions (the first model also compiles
    small eager operations once per process)."""
    counts = []
    for n_layers, seq in [(2, 6), (5, 11)]:
        config = DecoderConfig(vocab_size=VOCAB, d_model=8, n_layers=n_layers, n_heads=2,
                               d_mlp=8)
        model = Decoder(config)
        tokens = jnp.asarray(np.random.default_rng(n_layers).integers(0, VOCAB, (1, seq)))
        params = random_params(model, tokens)
        _, cache = mi.capture(model, params, tokens, sites=["resid_pre"])
        metric = metrics.logit_diff(jnp.array([1]), jnp.array([2]))
        with CompileCounter() as compiles:
            result = patching.get_act_patch_resid_pre(model, params, tokens, cache, metric,
                                                      progress=False, position_blocks=2,
                                                      chunk_size=4, skip_unchanged=False)
        assert result.cost["groups"] == result.cost["compiles"] == 2
        assert result.cost["compile_s"] > 0 and result.cost["peak_bytes"] > 0
        counts.append(compiles.count)
    assert counts[1] == 1 + 2  # the resume state's forward, a cell function per window


def test_the_memory_budget_is_checked_on_the_executable(setup):
    model, params, _, corrupted, _, cache, metric = setup
    roomy = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                             progress=False)
    tight = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                             progress=False, memory_budget=2_000)
    np.testing.assert_allclose(tight.values, roomy.values, atol=1e-6)
    assert tight.cost["chunks"] > roomy.cost["chunks"]
    assert tight.cost["peak_bytes"] < roomy.cost["peak_bytes"]


def test_reuse_with_a_metric_on_full_logits(setup):
    """A plain callable needs every position's logits: reuse skips layers, not positions."""
    model, params, _, corrupted, _, cache, _ = setup

    def last_logit_diff(logits):
        return (logits[:, -1, 1] - logits[:, -1, 4]).mean()

    plain = patching.get_act_patch_resid_pre(model, params, corrupted, cache, last_logit_diff,
                                             progress=False, reuse=False)
    reused = patching.get_act_patch_resid_pre(model, params, corrupted, cache, last_logit_diff,
                                              progress=False, reuse=True, chunk_size=SEQ)
    np.testing.assert_allclose(reused.values, plain.values, atol=1e-5)
    assert reused.cost["groups"] == 1 and reused.cost["flops"] < plain.cost["flops"]


def test_executed_flops_are_one_selected_logit_forward_per_cell(setup):
    model, params, _, corrupted, _, cache, metric = setup
    cells = N_LAYERS * SEQ
    result = patching.get_act_patch_resid_pre(model, params, corrupted, cache, metric,
                                              progress=False, reuse=False, chunk_size=cells,
                                              skip_unchanged=False)
    positions, columns = metric.positions(BATCH, SEQ), metric.columns(BATCH)
    one = matmul_flops(lambda p, t: model.apply({"params": p}, t, logit_positions=positions,
                                                logit_columns=columns), params, corrupted)
    full = matmul_flops(lambda p, t: model.apply({"params": p}, t), params, corrupted)
    assert (result.cost["flops"], result.cost["naive_flops"]) == (cells * one, cells * full)
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
    with pytest.raises(ValueError, match="position_blocks must be"):
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
