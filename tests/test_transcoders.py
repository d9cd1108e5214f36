"""Transcoders and SAEs: activations (TopK, JumpReLU and its threshold gradients), the
sparsity penalty, training on streamed activations, metrics against numpy, splicing
(exact with the error term; without it, against a decoder whose MLPs are replaced)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechinterp.models import Decoder, DecoderConfig
from mechinterp.models.decoder import unstack_layers
from mechinterp.models.layers import GatedMLP

import mechinterp as mi
from mechinterp import transcoders as T
from mechinterp.train import transcoders as TT

CONFIG = DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_mlp=32)
N_FEATURES = 24


@pytest.fixture(scope="module")
def setup():
    model = Decoder(CONFIG)
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, CONFIG.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    transcoder = T.Transcoder(d_in=16, d_out=16, n_features=N_FEATURES)
    tc_params = T.init_layers(transcoder, jax.random.key(2), CONFIG.n_layers)
    tc_params = {**tc_params, "b_dec": 0.01 * jax.random.normal(jax.random.key(3), (2, 16))}
    return model, params, tokens, transcoder, tc_params


def test_mlp_inputs_are_what_the_mlp_reads(setup):
    model, params, tokens, _, _ = setup
    acts = T.mlp_activations(model, params, tokens)
    _, cache = mi.capture(model, params, tokens, sites=["mlp.pre", "mlp_out"])
    gate = nn.meta.unbox(params)["layers"]["mlp"]["gate"]
    np.testing.assert_allclose(jnp.einsum("lbte,lem->lbtm", acts["mlp_in"], gate),
                               cache["mlp.pre"], atol=1e-6)
    np.testing.assert_array_equal(acts["mlp_out"], cache["mlp_out"])


def test_topk_keeps_exactly_the_k_largest():
    z = jax.random.normal(jax.random.key(0), (5, 20)) + 3.0  # all positive
    out = np.asarray(T.topk_relu(z, 4))
    assert (np.count_nonzero(out, axis=-1) == 4).all()
    top = np.argsort(-np.asarray(z), axis=-1)[:, :4]
    expected = np.zeros_like(out)
    np.put_along_axis(expected, top, np.take_along_axis(np.asarray(z), top, -1), -1)
    np.testing.assert_array_equal(out, expected)
    # Negative winners are zeroed by the ReLU: never more than k active.
    assert (np.count_nonzero(np.asarray(T.topk_relu(z - 10.0, 4)), axis=-1) == 0).all()


def test_jumprelu_forward_and_straight_through_gradients():
    z = jnp.array([[0.10, 0.52, 0.70], [0.49, 0.45, 0.20], [0.56, 0.60, 0.95]])
    theta = jnp.array([0.5, 0.5, 0.9])
    eps = 0.1
    np.testing.assert_array_equal(T.jumprelu(z, theta, eps), np.where(z > theta, z, 0.0))
    # d/dtheta sum JumpReLU = -(theta/eps) * #{|z - theta| < eps/2}
    near = (np.abs(np.asarray(z) - np.asarray(theta)) < eps / 2).sum(0)
    g_theta = jax.grad(lambda t: T.jumprelu(z, t, eps).sum())(theta)
    np.testing.assert_allclose(g_theta, -np.asarray(theta) / eps * near, rtol=1e-6)
    g_z = jax.grad(lambda x: T.jumprelu(x, theta, eps).sum())(z)
    np.testing.assert_array_equal(g_z, (z > theta).astype(np.float32))
    # The L0 step: d/dtheta = -(1/eps) * #{near}, no gradient to z.
    g_theta = jax.grad(lambda t: T.step(z, t, eps).sum())(theta)
    np.testing.assert_allclose(g_theta, -near / eps, rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(lambda x: T.step(x, theta, eps).sum())(z), 0.0)


def test_relu_penalty_and_jumprelu_l0_against_numpy():
    x = jax.random.normal(jax.random.key(4), (7, 16))
    relu = T.Transcoder(d_in=16, d_out=16, n_features=12)
    p = relu.init(jax.random.key(5), x)["params"]
    a = np.maximum(np.asarray(x) @ np.asarray(p["W_enc"]) + np.asarray(p["b_enc"]), 0)
    expected = a @ np.linalg.norm(np.asarray(p["W_dec"]), axis=-1)
    np.testing.assert_allclose(relu.apply({"params": p}, x, method=T.Transcoder.sparsity),
                               expected, rtol=1e-5)
    jump = T.Transcoder(d_in=16, d_out=16, n_features=12, activation="jumprelu",
                        init_threshold=0.3)
    p = jump.init(jax.random.key(5), x)["params"]
    pre = np.asarray(x) @ np.asarray(p["W_enc"])
    l0 = jump.apply({"params": p}, x, method=T.Transcoder.sparsity)
    np.testing.assert_array_equal(l0, (pre > np.float32(0.3)).sum(-1))
    y, acts = jump.apply({"params": p}, x)
    assert ((np.asarray(acts) == 0) | (np.asarray(acts) > 0.3 - 1e-6)).all()
    np.testing.assert_allclose(y, np.asarray(acts) @ np.asarray(p["W_dec"]), rtol=1e-5,
                               atol=1e-6)


def test_bad_settings_raise():
    x = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="activation"):
        T.Transcoder(d_in=4, d_out=4, n_features=8, activation="gelu").init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match="k <= n_features"):
        T.Transcoder(d_in=4, d_out=4, n_features=8, activation="topk", k=9).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match="kind"):
        T.pairs({}, "mlp")


def test_fold_scales_gives_the_same_map_on_raw_activations():
    tc = T.Transcoder(d_in=8, d_out=8, n_features=16, activation="jumprelu")
    p = T.init_layers(tc, jax.random.key(0), 2)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8)) * 3.0
    x_scale, y_scale = jnp.array([3.0, 0.5]), jnp.array([0.01, 2.0])
    y_unit, a_unit = T.apply_layers(tc, p, x / x_scale[:, None, None])
    y_raw, a_raw = T.apply_layers(tc, TT.fold_scales(p, x_scale, y_scale), x)
    np.testing.assert_allclose(a_raw, a_unit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_raw, y_unit * y_scale[:, None, None], rtol=1e-5, atol=1e-7)


def _batches(seed):
    key = jax.random.key(seed)
    while True:
        key, sub = jax.random.split(key)
        tokens = jax.random.randint(sub, (8, 6), 0, CONFIG.vocab_size)
        yield {"tokens": tokens, "valid": (tokens != 0).astype(jnp.float32)}


def _token_source(seed, n=64):
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, CONFIG.vocab_size, 6).astype(np.int32)}
            for _ in range(n)]


@pytest.mark.slow
def test_training_through_mechinterp_train_lowers_the_loss(setup, tmp_path):
    """TopK transcoders trained by mechinterp.train.fit on streamed activations, AuxK on:
    the loss falls, the decoder stays frozen, the result is TopK-sparse and the run's
    metrics log and checkpoint exist (fit's machinery, not a loop of our own)."""
    model, params, *_ = setup
    config = TT.TrainingConfig(n_features=32, activation="topk", k=4, steps=40,
                              learning_rate=1e-2, batch_size=8, aux_k=8)
    trained = TT.train_transcoders(model, params, _token_source(0), config, tmp_path,
                                  pad_id=0, log_every=10)
    losses = [h["loss"] for h in trained.history if h["kind"] == "train"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(h["aux_loss"] >= 0 for h in trained.history)
    assert (tmp_path / "checkpoints").is_dir()
    tokens = jnp.asarray(np.stack([e["tokens"] for e in _token_source(1, 8)]))
    _, acts = T.apply_layers(trained.transcoder, trained.params,
                             T.mlp_activations(model, params, tokens)["mlp_in"])
    assert (np.count_nonzero(np.asarray(acts), axis=-1) <= 4).all()


def test_auxk_reconstructs_the_residual_from_dead_features_only():
    """AuxK against numpy: the top-k_aux pre-activations among features that never fired on
    a weighted token, decoded, against the stop-gradient residual; padding tokens do not
    make a feature alive; 0 when nothing is dead."""
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(5, 6)).astype(np.float32)
    acts = np.zeros((5, 6), np.float32)
    acts[0, 1] = acts[3, 4] = 1.0          # features 1 and 4 fire on weighted tokens
    acts[4, 2] = 1.0                       # feature 2 fires only on the padding token
    weights = np.array([1, 1, 1, 1, 0], np.float32)
    residual = rng.normal(size=(5, 3)).astype(np.float32)
    w_dec = rng.normal(size=(6, 3)).astype(np.float32)
    got = TT.auxk_nmse(jnp.asarray(pre), jnp.asarray(acts), jnp.asarray(residual),
                      jnp.asarray(w_dec), jnp.asarray(weights), 2)
    dead = np.array([0, 2, 3, 5])
    estimate = np.zeros((5, 3))
    for n in range(5):
        top = dead[np.argsort(-pre[n, dead])[:2]]
        estimate[n] = np.maximum(pre[n, top], 0) @ w_dec[top]
    w = weights.astype(bool)
    sse = ((residual - estimate)[w] ** 2).sum()
    sst = ((residual[w] - residual[w].mean(0)) ** 2).sum()
    assert float(got) == pytest.approx(sse / sst, rel=1e-5)
    grad = jax.grad(lambda r: TT.auxk_nmse(jnp.asarray(pre), jnp.asarray(acts), r,
                                          jnp.asarray(w_dec), jnp.asarray(weights), 2))
    assert not np.asarray(grad(jnp.asarray(residual))).any()      # the residual is a target
    alive = np.ones((5, 6), np.float32)
    assert float(TT.auxk_nmse(jnp.asarray(pre), jnp.asarray(alive), jnp.asarray(residual),
                             jnp.asarray(w_dec), jnp.asarray(weights), 2)) == 0.0


def test_metrics_against_numpy(setup):
    model, params, _, tc, tc_params = setup
    batch = next(_batches(99))
    metrics = T.evaluate(model, params, tc, tc_params, [batch])
    acts = T.mlp_activations(model, params, batch["tokens"])
    w = np.asarray(batch["valid"]).reshape(-1).astype(bool)
    x = np.asarray(acts["mlp_in"]).reshape(2, -1, 16)[:, w]
    y = np.asarray(acts["mlp_out"]).reshape(2, -1, 16)[:, w]
    y_hat, a = (np.asarray(v) for v in T.apply_layers(tc, tc_params, x))
    sse = ((y - y_hat) ** 2).sum(-1)
    sst = ((y - y.mean(1, keepdims=True)) ** 2).sum((1, 2))
    np.testing.assert_allclose(metrics["mse"], sse.mean(1), rtol=1e-4)
    np.testing.assert_allclose(metrics["fve"], 1 - sse.sum(1) / sst, rtol=1e-3)
    np.testing.assert_allclose(metrics["l0"], (a > 0).sum(-1).mean(1), rtol=1e-6)
    np.testing.assert_allclose(metrics["dead_fraction"], ((a > 0).sum(1) == 0).mean(-1))
    assert metrics["loss_ablated"] != metrics["loss_clean"]
    expected = ((metrics["loss_ablated"] - metrics["loss_spliced"])
                / (metrics["loss_ablated"] - metrics["loss_clean"]))
    assert metrics["loss_recovered"] == pytest.approx(expected)


def test_splice_with_the_error_term_reproduces_the_logits(setup):
    model, params, tokens, tc, tc_params = setup
    clean = model.apply({"params": params}, tokens)
    spliced = T.spliced_logits(model, params, tokens, tc, tc_params, error_term=True)
    np.testing.assert_allclose(spliced, clean, rtol=1e-6, atol=1e-6)
    without = T.spliced_logits(model, params, tokens, tc, tc_params, error_term=False)
    assert np.abs(np.asarray(without - clean)).max() > 1e-3  # the error term matters


@pytest.mark.parametrize("layers", [None, (1,)])
def test_splice_without_error_equals_a_decoder_with_transcoder_mlps(setup, layers):
    model, params, tokens, tc, tc_params = setup
    unrolled = Decoder(CONFIG.__class__(**{**CONFIG.__dict__, "scan_layers": False}))
    flat = unstack_layers(params, CONFIG.n_layers)
    spliced_layers = range(CONFIG.n_layers) if layers is None else layers

    def replace_mlps(next_fun, args, kwargs, context):
        if isinstance(context.module, GatedMLP):
            layer = int(context.module.parent.name.split("_")[1])
            if layer in spliced_layers:
                p = T.layer_params(tc_params, layer)
                return tc.apply({"params": p}, args[0])[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(replace_mlps):
        expected = unrolled.apply({"params": flat}, tokens)
    got = T.spliced_logits(model, params, tokens, tc, tc_params, error_term=False,
                           layers=layers)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_steer_features_adds_decoder_vectors(setup):
    _, _, _, _, tc_params = setup
    shape = (2, 3, 6, 16)
    iv = T.steer_features(tc_params, [(1, 4, 7), (0, 2, 3), (1, 4, 5)], [2.0, -1.0, 0.5],
                          shape)["mlp_out"]
    w = np.asarray(tc_params["W_dec"])
    expected = np.zeros(shape, np.float32)
    expected[1, :, 4] = 2.0 * w[1, 7] + 0.5 * w[1, 5]
    expected[0, :, 2] = -w[0, 3]
    np.testing.assert_allclose(iv.add, expected, rtol=1e-6)
    assert float(iv.scale) == 1.0


def test_a_residual_sae_reconstructs_resid_mid(setup):
    model, params, tokens, _, _ = setup
    acts = T.mlp_activations(model, params, tokens)
    x, y = T.pairs(acts, "sae")
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, acts["resid_mid"].reshape(2, -1, 16))
    sae = T.Transcoder(d_in=16, d_out=16, n_features=N_FEATURES)
    sae_params = T.init_layers(sae, jax.random.key(7), CONFIG.n_layers)
    metrics = T.evaluate(model, params, sae, sae_params, [{"tokens": tokens}], kind="sae")
    assert set(metrics) == {"mse", "fve", "l0", "dead_fraction"}  # no splicing for SAEs
    y_hat, _ = T.apply_layers(sae, sae_params, x)
    np.testing.assert_allclose(metrics["mse"], np.mean(np.sum((x - y_hat) ** 2, -1), 1),
                               rtol=1e-5)
