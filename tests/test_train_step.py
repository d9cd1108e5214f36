"""The sharded train step on 8 fake CPU devices: every parallel layout matches one device.

Also: state is created directly in the rules' shardings, gradient accumulation equals the
full batch, mixed precision keeps float32 master weights, auxiliary losses are added,
dropout randomness follows the step, and the FLOP count matches the decoder.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mechinterp.models import Decoder, DecoderConfig
from mechinterp.train import flop_counts
from mechinterp.train.losses import get_objective
from mechinterp.train.mesh import DEFAULT_RULES, global_batch, make_mesh
from mechinterp.train.optim import lr_schedule, make_optimizer
from mechinterp.train.state import (abstract_train_state, init_train_state, replace_params,
                                    shardings_of)
from mechinterp.train.step import make_eval_step, make_train_step
from test_train_support import ToyClassifier, ToyLM, token_batch

SINGLE = {"data": 1}
LAYOUTS = {
    "data": {"data": 8},
    "fsdp": {"fsdp": 8},
    "tensor": {"tensor": 4, "data": 2},
    "mixed": {"data": 2, "fsdp": 2, "tensor": 2},
}
SCHEDULE = lr_schedule("cosine", 0.05, warmup_steps=1, total_steps=40)
TX = make_optimizer("adamw", SCHEDULE, weight_decay=0.1, clip_norm=1.0)


def _mesh(sizes):
    return make_mesh(sizes, jax.devices()[:1] if sizes is SINGLE else None)


def _initial(model, batch, objective="next_token"):
    """A freshly initialized state on one device, as host arrays."""
    inputs = get_objective(objective).inputs(batch)
    state = init_train_state(model, TX, inputs, mesh=_mesh(SINGLE), rules=DEFAULT_RULES)
    return jax.device_get(state)


def _train(model, batch, sizes, initial, *, steps=3, objective="next_token", **step_kwargs):
    """Place ``initial`` in the layout's shardings and take ``steps`` steps on ``batch``."""
    mesh = _mesh(sizes)
    inputs = get_objective(objective).inputs(batch)
    shardings = shardings_of(abstract_train_state(model, TX, inputs, mesh=mesh,
                                                  rules=DEFAULT_RULES))
    state = jax.device_put(initial, shardings)
    step = make_train_step(model, TX, shardings, mesh=mesh, rules=DEFAULT_RULES,
                           objective=objective, lr_schedule=SCHEDULE, **step_kwargs)
    history = []
    for _ in range(steps):
        state, metrics = step(state, global_batch(batch, mesh, DEFAULT_RULES))
        history.append(jax.device_get(metrics))
    return state, history


def _assert_same(a, b, rtol=1e-5, atol=1e-6, param_atol=2e-5):
    for key in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose([m[key] for m in a[1]], [m[key] for m in b[1]],
                                   rtol=rtol, atol=atol, err_msg=key)
    # Adam divides by sqrt(second moment): where gradients are ~0, float noise in them
    # moves parameters by up to ~lr * noise / eps, hence the looser parameter tolerance.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=rtol, atol=param_atol),
                 a[0].params, b[0].params)


@pytest.fixture(scope="module")
def toy_initial():
    return _initial(ToyLM(), token_batch())


@pytest.fixture(scope="module")
def toy_single(toy_initial):
    return _train(ToyLM(), token_batch(), SINGLE, toy_initial)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layouts_match_one_device(toy_initial, toy_single, layout):
    _assert_same(toy_single, _train(ToyLM(), token_batch(), LAYOUTS[layout], toy_initial))


def test_gradient_accumulation_matches_the_full_batch(toy_initial, toy_single):
    _assert_same(toy_single, _train(ToyLM(), token_batch(), LAYOUTS["mixed"], toy_initial,
                                    grad_accum=2))


def test_state_is_created_in_the_rules_shardings():
    mesh = make_mesh(LAYOUTS["mixed"])
    tx = make_optimizer("adamw", 0.1, lr_multipliers={"w_in": jnp.ones(32)})
    state = init_train_state(ToyLM(), tx, (token_batch()["tokens"],), mesh=mesh,
                             rules=DEFAULT_RULES)
    specs = {"embedding": P("tensor", "fsdp"), "w_in": P("fsdp", "tensor"),
             "b_in": P("tensor"), "w_out": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor")}
    for name, spec in specs.items():
        array = state.params[name]
        assert array.sharding.spec == spec, name
        expected = tuple(n // (2 if axes else 1) for n, axes in zip(array.shape, spec))
        assert {s.data.shape for s in array.addressable_shards} == {expected}, name
    adam = state.opt_state[0]  # chain: scale_by_adam, learning rate, multipliers
    assert adam.mu["w_in"].sharding.spec == P("fsdp", "tensor")
    assert adam.count.sharding.spec == P()
    multipliers = state.opt_state[-1].multipliers
    assert multipliers["w_in"].sharding.spec == P()  # (32,) does not mirror (16, 32)
    assert state.rng.sharding.spec == P()
    single = init_train_state(ToyLM(), tx, (token_batch()["tokens"],), mesh=make_mesh(
        SINGLE, jax.devices()[:1]), rules=DEFAULT_RULES)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(single))


def test_replace_params_sets_values_in_their_shardings_and_rejects_bad_paths():
    """fit(init_params=...) goes through replace_params: given values land in the state
    with each parameter's sharding and dtype, as copies (the step donates the state), and a
    path or shape the model does not have is an error naming it."""
    mesh = make_mesh(LAYOUTS["mixed"])
    tx = make_optimizer("adamw", 0.1)
    state = init_train_state(ToyLM(), tx, (token_batch()["tokens"],), mesh=mesh,
                             rules=DEFAULT_RULES)
    w_in = np.arange(16 * 32, dtype=np.float64).reshape(16, 32)
    given = jnp.asarray(state.params["w_out"]) + 1.0
    new = replace_params(state, {"w_in": w_in, "w_out": given})
    np.testing.assert_array_equal(new.params["w_in"], w_in.astype(np.float32))
    assert new.params["w_in"].dtype == jnp.float32
    assert new.params["w_in"].sharding == state.params["w_in"].sharding
    assert new.params["w_out"] is not given and not new.params["w_out"].is_deleted()
    np.testing.assert_array_equal(new.params["embedding"], state.params["embedding"])
    with pytest.raises(KeyError, match="w_inn"):
        replace_params(state, {"w_inn": w_in})
    with pytest.raises(ValueError, match=r"init_params\['w_in'\] has shape \(32, 16\)"):
        replace_params(state, {"w_in": w_in.T})


DECODER = DecoderConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_mlp=64)


def test_decoder_parameters_are_sharded_as_the_rules_say():
    mesh = make_mesh(LAYOUTS["mixed"])
    abstract = abstract_train_state(Decoder(DECODER), TX, (token_batch()["tokens"],),
                                    mesh=mesh, rules=DEFAULT_RULES)
    specs = jax.tree.map(lambda x: x.sharding.spec, abstract.params)
    assert specs == {
        "embedding": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "norm": {"scale": P("fsdp")},
        "layers": {
            "attn": {"wq": P(None, "fsdp", "tensor", None), "wk": P(None, "fsdp", "tensor", None),
                     "wv": P(None, "fsdp", "tensor", None), "wo": P(None, "tensor", None, "fsdp")},
            "mlp": {"gate": P(None, "fsdp", "tensor"), "up": P(None, "fsdp", "tensor"),
                    "down": P(None, "tensor", "fsdp")},
            "attn_norm": {"scale": P(None, "fsdp")}, "mlp_norm": {"scale": P(None, "fsdp")},
        },
    }
    adam = abstract.opt_state[1]  # chain: clip, adam, weight decay, learning rate, multipliers
    assert jax.tree.map(lambda x: x.sharding.spec, adam.mu) == specs


@pytest.mark.slow
def test_decoder_sharded_steps_match_one_device():
    batch = token_batch(batch=8, length=10)
    initial = _initial(Decoder(DECODER), batch)
    single = _train(Decoder(DECODER), batch, SINGLE, initial, steps=2)
    sharded = _train(Decoder(DECODER), batch, LAYOUTS["mixed"], initial, steps=2)
    _assert_same(single, sharded)
    wq = sharded[0].params["layers"]["attn"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 16, 2, 8)}


def test_model_activation_constraints_apply_inside_the_step():
    mesh = _mesh(LAYOUTS["mixed"])
    abstract = abstract_train_state(ToyLM(), TX, (token_batch()["tokens"],), mesh=mesh,
                                    rules=DEFAULT_RULES)
    step = make_train_step(ToyLM(), TX, shardings_of(abstract), mesh=mesh, rules=DEFAULT_RULES)
    hlo = step.lower(abstract, global_batch(token_batch(), mesh, DEFAULT_RULES)).as_text()
    assert "sharding_constraint" in hlo  # ToyLM's nn.with_logical_constraint


def test_mixed_precision_keeps_float32_master_weights(toy_initial, toy_single):
    state, history = _train(ToyLM(), token_batch(), LAYOUTS["data"], toy_initial, steps=1,
                            compute_dtype=jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    f32_loss = toy_single[1][0]["loss"]
    np.testing.assert_allclose(history[0]["loss"], f32_loss, rtol=2e-2)
    assert history[0]["loss"] != f32_loss  # the forward really ran in bfloat16


def test_auxiliary_losses_are_added_to_the_loss_and_its_gradient(toy_initial, toy_single):
    _, history = _train(ToyLM(aux_weight=0.5), token_batch(), LAYOUTS["data"], toy_initial,
                        steps=1)
    metrics, plain = history[0], toy_single[1][0]
    assert metrics["aux_loss"] > 0
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + metrics["aux_loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["ce"], plain["loss"], rtol=1e-5)
    assert not np.isclose(metrics["grad_norm"], plain["grad_norm"])


def test_dropout_randomness_is_a_function_of_the_step(toy_initial, toy_single):
    mesh, model = _mesh(LAYOUTS["mixed"]), ToyLM(dropout=0.5)
    shardings = shardings_of(abstract_train_state(model, TX, (token_batch()["tokens"],),
                                                  mesh=mesh, rules=DEFAULT_RULES))
    step = make_train_step(model, TX, shardings, mesh=mesh, rules=DEFAULT_RULES,
                           model_kwargs={"deterministic": False}, donate=False)
    state = jax.device_put(toy_initial, shardings)
    batch = global_batch(token_batch(), mesh, DEFAULT_RULES)
    first, again = step(state, batch)[1]["loss"], step(state, batch)[1]["loss"]
    later = step(state.replace(step=state.step + 7), batch)[1]["loss"]
    assert first == again  # same step, same dropout masks
    assert later != first  # another step draws other masks
    assert not np.isclose(first, toy_single[1][0]["loss"])  # dropout was applied


def test_classification_objective_and_eval_step():
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.normal(size=(16, 8)).astype(np.float32),
             "label": rng.integers(0, 4, 16).astype(np.int32)}
    initial = _initial(ToyClassifier(), batch, "classification")
    state, history = _train(ToyClassifier(), batch, LAYOUTS["data"], initial, steps=30,
                            objective="classification")
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    mesh = make_mesh(LAYOUTS["data"])
    evaluate = make_eval_step(ToyClassifier(), jax.tree.map(lambda x: x.sharding, state.params),
                              mesh=mesh, rules=DEFAULT_RULES, objective="classification")
    sums = evaluate(state.params, global_batch(batch, mesh, DEFAULT_RULES))
    logits = ToyClassifier().apply({"params": jax.device_get(state.params)}, batch["inputs"])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()
    assert float(sums["weight"]) == 16.0
    np.testing.assert_allclose(sums["loss"], expected, rtol=1e-5)
    assert float(sums["correct"]) == float(np.sum(np.argmax(logits, -1) == batch["label"]))
    with pytest.raises(KeyError, match=r"needs batch\['label'\]"):
        get_objective("classification").terms(jnp.zeros((2, 4)), {"inputs": jnp.zeros((2, 8))})


def test_decoder_flop_count_matches_its_parameters():
    config = DecoderConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                           d_mlp=96)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(
        jax.eval_shape(Decoder(config).init, jax.random.PRNGKey(0), tokens)["params"])
    sizes = {jax.tree_util.keystr(p, simple=True, separator="/"): np.prod(x.shape)
             for p, x in jax.tree_util.tree_leaves_with_path(params)}
    matmul = sum(n for name, n in sizes.items() if "norm" not in name and name != "embedding")
    assert flop_counts.decoder_matmul_params(config) == matmul
    per_token = flop_counts.decoder_train_flops_per_token(config, seq_len=8)
    assert per_token == 6 * matmul + 12 * 3 * 4 * 8 * 8
    tied = dataclasses.replace(config, tie_embeddings=True)
    assert flop_counts.decoder_matmul_params(tied) == matmul
    assert flop_counts.mfu(1e12, 1.0, 2, 1e12) == 0.5
    assert flop_counts.mfu(1e12, 1.0, 2, None) is None
