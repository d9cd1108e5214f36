"""The train state, its shardings from the logical-axis rules, and sharded initialization.

The state is created directly in its final shardings: ``jax.eval_shape`` gives its
structure, the rules give each leaf's sharding, and ``jax.jit(init, out_shardings=...)``
materializes each shard on its own device (nothing is ever gathered on one device).

Optimizer-state leaves that mirror a parameter (Adam moments, per-element masks: same
shape, key path ending in the parameter's path) take that parameter's sharding; all other
optimizer leaves (step counts, scalar multipliers, factored second moments) are replicated.
Parameters that are not declared with logical axes are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mechinterp.sharding import input_specs as _input_specs, logical_param_specs  # noqa: F401
from mechinterp.sharding import zeros as _zeros
from mechinterp.train.mesh import Rules, check_divisible, check_rules, logical_to_spec, path_str


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    ``rng`` is the run's base key (raw ``uint32[2]``); each step derives its dropout key
    from it and ``step``, so a resumed run draws the same randomness.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, specs, seed: int):
    def init() -> TrainState:
        params_key, dropout_key, base_key = jax.random.split(jax.random.PRNGKey(seed), 3)
        variables = model.init({"params": params_key, "dropout": dropout_key},
                               *_zeros(specs))
        params = nn.meta.unbox(variables["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=base_key)

    return init


def _mirror_specs(opt_state, params, param_specs) -> Any:
    """Spec of each optimizer-state leaf: its parameter's if it mirrors one, else ``P()``."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    by_path = {tuple(path): (tuple(leaf.shape), spec)
               for (path, leaf), spec in zip(leaves, specs)}

    def spec_of(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return PartitionSpec()

    return jax.tree.map_with_path(spec_of, opt_state)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         inputs: Sequence[Any], *, mesh: Mesh, rules: Rules,
                         seed: int = 0) -> TrainState:
    """The train state as ``jax.ShapeDtypeStruct`` s carrying their target shardings.

    ``inputs``: the model's positional inputs (arrays or ``ShapeDtypeStruct``; only their
    trailing shapes and dtypes matter). Raises if a parameter uses a logical axis the rules
    do not map, or if a sharded dimension does not divide by its mesh axes.
    """
    rules = check_rules(rules, mesh)
    specs = _input_specs(inputs)
    abstract = jax.eval_shape(_init_fn(model, tx, specs, seed))
    logical = logical_param_specs(model, inputs)
    param_specs = jax.tree_util.tree_map_with_path(
        lambda path, spec: logical_to_spec(spec, rules, where=f"parameter {path_str(path)!r}"),
        logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    check_divisible(abstract.params, param_specs, mesh)
    specs_tree = TrainState(
        step=PartitionSpec(), params=param_specs,
        opt_state=_mirror_specs(abstract.opt_state, abstract.params, param_specs),
        rng=PartitionSpec())
    return jax.tree.map(
        lambda leaf, spec: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                sharding=NamedSharding(mesh, spec)),
        abstract, specs_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings_of(abstract: Any) -> Any:
    """The ``.sharding`` of every leaf."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     inputs: Sequence[Any], *, mesh: Mesh, rules: Rules,
                     seed: int = 0) -> TrainState:
    """A fresh :class:`TrainState`, each leaf created directly in its sharding."""
    abstract = abstract_train_state(model, tx, inputs, mesh=mesh, rules=rules, seed=seed)
    init = _init_fn(model, tx, _input_specs(inputs), seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(check_rules(rules, mesh)):
        return jax.jit(init, out_shardings=shardings_of(abstract))()


def replace_params(state: TrainState, values: Any) -> TrainState:
    """``state`` with some parameters set to ``values``: a nested dict mirroring part of
    ``state.params`` (e.g. a pretrained model's parameters under its submodule's name).
    Each value is cast to the parameter's dtype and placed in its sharding. Raises on a path
    that is not a parameter or a shape that differs. The optimizer state is kept: the
    optimizers of :mod:`.optim` start from zero moments whatever the parameter values."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(values), sep="/")
    current = flax.traverse_util.flatten_dict(state.params, sep="/")
    unknown = sorted(set(flat) - set(current))
    if unknown:
        raise KeyError(f"init_params has paths {unknown[:5]} that are not parameters of the "
                       f"model; its parameters include {sorted(current)[:8]}")
    for path, value in flat.items():
        if tuple(jnp.shape(value)) != tuple(current[path].shape):
            raise ValueError(f"init_params[{path!r}] has shape {jnp.shape(value)} but the "
                             f"model's parameter has shape {current[path].shape}")
        # a copy: the train step donates the state, which must not delete the caller's arrays
        current[path] = jax.device_put(jnp.array(value, current[path].dtype, copy=True),
                                       current[path].sharding)
    return state.replace(params=flax.traverse_util.unflatten_dict(current, sep="/"))

