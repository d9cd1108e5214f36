"""Schedules, freezing, learning-rate multipliers and gradient masks as optax transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechinterp.train import optim as O


def _params():
    return {"embed": {"table": jnp.ones((4, 3))},
            "layers": {"attn": {"wq": jnp.ones((3, 3))}, "mlp": {"up": jnp.ones((3, 5)),
                                                              "bias": jnp.ones((5,))}}}


def _grads(params):
    return jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)


def _update(tx, params, state=None, grads=None):
    state = tx.init(params) if state is None else state
    updates, state = tx.update(_grads(params) if grads is None else grads, state, params)
    return optax.apply_updates(params, updates), updates, state


def test_schedules_warm_up_then_decay():
    cosine = O.lr_schedule("cosine", 1.0, warmup_steps=10, total_steps=110, end_factor=0.1)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-6)
    linear = O.lr_schedule("linear", 2.0, warmup_steps=0, total_steps=10)
    np.testing.assert_allclose([linear(0), linear(5), linear(10)], [2.0, 1.0, 0.0], atol=1e-6)
    constant = O.lr_schedule("constant", 3.0, warmup_steps=4, total_steps=100)
    np.testing.assert_allclose([constant(2), constant(4), constant(99)], [1.5, 3.0, 3.0])
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        O.lr_schedule("step", 1.0)
    with pytest.raises(ValueError, match="warmup_steps=20 must be between"):
        O.lr_schedule("cosine", 1.0, warmup_steps=20, total_steps=10)


def test_frozen_params_do_not_move_and_carry_no_adam_state():
    params = _params()
    tx = O.make_optimizer("adamw", 0.1, weight_decay=0.5, freeze_patterns=[r"^embed/", "bias"])
    new, _, state = _update(tx, params)
    np.testing.assert_array_equal(new["embed"]["table"], params["embed"]["table"])
    np.testing.assert_array_equal(new["layers"]["mlp"]["bias"], params["layers"]["mlp"]["bias"])
    assert not np.allclose(new["layers"]["attn"]["wq"], params["layers"]["attn"]["wq"])
    adam_leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                   if any(getattr(key, "name", None) == "mu" for key in path)]
    assert len(adam_leaves) == 2  # wq and up only


def test_multiplier_half_halves_the_sgd_update():
    params = _params()
    base = O.make_optimizer("sgd", 0.1)
    half = O.make_optimizer("sgd", 0.1, lr_multipliers={"attn": 0.5})
    _, full_updates, _ = _update(base, params)
    _, half_updates, _ = _update(half, params)
    np.testing.assert_allclose(half_updates["layers"]["attn"]["wq"],
                               0.5 * full_updates["layers"]["attn"]["wq"])
    np.testing.assert_allclose(half_updates["layers"]["mlp"]["up"],
                               full_updates["layers"]["mlp"]["up"])
    np.testing.assert_allclose(full_updates["layers"]["attn"]["wq"], -0.05)


def test_multipliers_change_during_training_without_recompiling():
    params = _params()
    tx = O.make_optimizer("sgd", 1.0, lr_multipliers={"mlp/up": 1.0})
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(_grads(params), state, params)
        return updates, state

    state = tx.init(params)
    updates, state = step(params, state)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up"], -0.5)
    state = O.set_multipliers(state, {"mlp/up": 0.0, "attn": 3.0})
    updates, state = step(params, state)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up"], 0.0)
    np.testing.assert_allclose(updates["layers"]["attn"]["wq"], -1.5)
    assert len(traces) == 1
    assert float(O.get_multipliers(state)["layers"]["attn"]["wq"]) == 3.0


def test_per_element_multipliers_and_their_errors():
    params = _params()
    column = jnp.asarray([1.0, 0.0, 2.0, 0.0, 1.0])
    tx = O.make_optimizer("sgd", 1.0, lr_multipliers={"mlp/up": column})
    _, updates, state = _update(tx, params)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up"][0], -0.5 * column)
    with pytest.raises(ValueError, match=r"'layers/mlp/up' has shape \(\), but the state holds"):
        O.set_multipliers(state, {"mlp/up": 1.0})
    with pytest.raises(ValueError, match=r"\['nothing'\] match no parameter path"):
        O.set_multipliers(state, {"nothing": 1.0})
    with pytest.raises(ValueError, match=r"does not broadcast to the parameter's shape \(3, 3\)"):
        O.scale_by_multipliers({"wq": jnp.ones(4)}).init(params)
    with pytest.raises(ValueError, match=r"\['wk'\] match no parameter path"):
        O.make_optimizer("sgd", 1.0, lr_multipliers={"wk": 2.0}).init(params)


def test_gradient_masks_zero_masked_entries_and_can_be_replaced():
    params = _params()
    neuron_mask = jnp.asarray([1.0, 1.0, 0.0, 0.0, 1.0])
    tx = O.make_optimizer("sgd", 1.0, gradient_masks={"mlp/up": neuron_mask}, clip_norm=10.0)
    _, updates, state = _update(tx, params)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up"],
                               -0.5 * jnp.broadcast_to(neuron_mask, (3, 5)))
    np.testing.assert_allclose(updates["layers"]["attn"]["wq"], -0.5)
    state = O.set_gradient_masks(state, {"mlp/up": jnp.zeros(5)})
    _, updates, _ = _update(tx, params, state)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up"], 0.0)
    with pytest.raises(ValueError, match="has no MultiplierState"):
        O.set_multipliers(optax.sgd(0.1).init(params), {"up": 1.0})


def test_clipping_weight_decay_and_optimizer_kinds():
    params = _params()
    big = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    _, updates, _ = _update(O.make_optimizer("sgd", 1.0, clip_norm=1.0), params, grads=big)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, params)
    _, updates, _ = _update(O.make_optimizer("sgd", 1.0, weight_decay=0.1), params, grads=zero)
    np.testing.assert_allclose(updates["layers"]["attn"]["wq"], -0.1)  # matrices decay
    np.testing.assert_allclose(updates["layers"]["mlp"]["bias"], 0.0)  # vectors do not
    for name in ("adamw", "adafactor"):
        new, _, _ = _update(O.make_optimizer(name, 0.01, momentum=0.9), params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        O.make_optimizer("lion", 0.1)
