"""The jitted train and eval steps.

``make_train_step`` returns ``step(state, batch) -> (state, metrics)``, a ``jax.jit`` with
the state's shardings in and out and the batch split as the rules' ``'batch'`` axis says;
``make_eval_step`` is its evaluation twin. A step does gradient accumulation over
``grad_accum`` microbatches (float32 sums, the full-batch gradient for any
``grad_accum``), mixed precision (``compute_dtype`` for the forward pass only), adds
every value sown into ``AUX_LOSS`` to the loss, and reports ``loss``, ``ce``,
``aux_loss``, ``accuracy``, ``grad_norm``, ``lr`` and ``weight``.

Design notes: docs/training.md ("The train and eval steps").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mechinterp.train.losses import Objective, get_objective
from mechinterp.train.mesh import Rules, batch_sharding, batch_spec, check_rules, replicated
from mechinterp.train.state import TrainState

AUX_LOSS = "aux_loss"


class MeshJit:
    """A jitted function traced and run with the mesh and the logical-axis rules in
    context, so ``nn.with_logical_constraint`` inside models takes effect (without them
    Flax silently skips the constraints)."""

    def __init__(self, jitted, mesh: Mesh, rules: Rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        """``jax.jit(...).lower`` in the same context (for HLO inspection, cost analysis)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)


def cast_floating(tree, dtype):
    """Cast the floating leaves of ``tree`` to ``dtype`` (others unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _forward(model: nn.Module, objective: Objective, compute_dtype, model_kwargs):
    def forward(params, batch, rng):
        variables = {"params": cast_floating(params, compute_dtype)}
        outputs, mutated = model.apply(variables, *objective.inputs(batch),
                                       rngs={"dropout": rng}, mutable=[AUX_LOSS],
                                       **model_kwargs)
        terms = objective.terms(outputs, batch)
        aux_leaves = jax.tree.leaves(mutated.get(AUX_LOSS, {}))
        aux = sum((jnp.sum(x.astype(jnp.float32)) for x in aux_leaves),
                  jnp.zeros((), jnp.float32))
        return terms, aux

    return forward


def split_microbatches(batch, n: int, sharding: NamedSharding):
    """``(B, ...)`` -> ``(n, B // n, ...)``, microbatch ``i`` holding rows ``i, i + n, ...``."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def _summaries(terms: Mapping[str, jax.Array], aux: jax.Array) -> dict[str, jax.Array]:
    weight = jnp.maximum(terms["weight"], 1.0)
    ce = terms["loss"] / weight
    metrics = {"loss": ce + aux, "ce": ce, "aux_loss": aux, "weight": terms["weight"]}
    if "correct" in terms:  # objectives without predictions to count (reconstruction) omit it
        metrics["accuracy"] = terms["correct"] / weight
    if "exact" in terms:
        metrics["exact_match"] = terms["exact"] / jnp.maximum(terms["sequences"], 1.0)
    return metrics


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    *,
    mesh: Mesh,
    rules: Rules,
    objective: str | Objective = "next_token",
    grad_accum: int = 1,
    compute_dtype: Any = None,
    lr_schedule: optax.Schedule | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    donate: bool = True,
) -> MeshJit:
    """A jitted ``step(state, batch) -> (state, metrics)``; see the module docstring.

    ``state_shardings``: a :class:`TrainState` of shardings (from
    :func:`mechinterp.train.state.abstract_train_state`). ``model_kwargs``: static keyword
    arguments for the forward pass (e.g. ``deterministic=False``). With ``donate`` the
    input state's buffers are reused for the output (do not use the old state afterwards).
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    rules = check_rules(rules, mesh)
    objective = get_objective(objective)
    forward = _forward(model, objective, compute_dtype, dict(model_kwargs or {}))
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_spec(rules)))
    param_shardings = state_shardings.params

    def grads_of(params, batch, rng, total_weight):
        def loss_fn(p):
            terms, aux = forward(p, batch, rng)
            return terms["loss"] / total_weight + aux / grad_accum, (terms, aux)

        (_, (terms, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return cast_floating(grads, jnp.float32), terms, aux

    def step(state: TrainState, batch):
        total_weight = jnp.maximum(objective.weight(batch), 1.0)
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum == 1:
            grads, terms, aux = grads_of(state.params, batch, jax.random.fold_in(rng, 0),
                                         total_weight)
        else:
            micro = split_microbatches(batch, grad_accum, micro_sharding)

            def body(carry, xs):
                mb, i = xs
                out = grads_of(state.params, mb, jax.random.fold_in(rng, i), total_weight)
                carry = jax.tree.map(jnp.add, carry, out)
                grads = jax.lax.with_sharding_constraint(carry[0], param_shardings)
                return (grads, *carry[1:]), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, state.params, first, rng, total_weight)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, terms, aux), _ = jax.lax.scan(
                body, zeros, (micro, jnp.arange(grad_accum)))
            aux = aux / grad_accum
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = _summaries(terms, aux)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return MeshJit(jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh, rules)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    ), mesh, rules)


def make_eval_step(
    model: nn.Module,
    param_shardings: Any,
    *,
    mesh: Mesh,
    rules: Rules,
    objective: str | Objective = "next_token",
    compute_dtype: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> MeshJit:
    """A jitted ``eval_step(params, batch) -> sums`` (loss, weight, correct, ...).

    Sums, not means: add them over the eval set, then call :func:`summarize`.
    """
    rules = check_rules(rules, mesh)
    objective = get_objective(objective)
    forward = _forward(model, objective, compute_dtype, dict(model_kwargs or {}))

    def eval_step(params, batch):
        terms, aux = forward(params, batch, jax.random.PRNGKey(0))
        return {**terms, "aux_loss": aux}

    return MeshJit(jax.jit(eval_step,
                           in_shardings=(param_shardings, batch_sharding(mesh, rules)),
                           out_shardings=replicated(mesh)), mesh, rules)


def summarize(sums: Mapping[str, Any], n_batches: int) -> dict[str, float]:
    """Eval metrics from sums over ``n_batches`` batches of :func:`make_eval_step`."""
    sums = {k: jnp.asarray(v, jnp.float32) for k, v in sums.items()}
    aux = sums.pop("aux_loss") / max(n_batches, 1)
    return {k: float(v) for k, v in _summaries(sums, aux).items()}
