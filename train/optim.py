"""Optimizers as composable optax transforms: schedules, parameter groups, multipliers, masks.

Parameters are addressed by path (``'layers/attn/wq'``) matched with ``re.search``; the
first matching pattern of a group table wins, and a pattern that matches nothing raises.

Key names: :func:`lr_schedule` (warmup, then cosine / linear / constant), :func:`freeze`
(no updates, no state), :func:`scale_by_multipliers` / :func:`set_multipliers` (per-group
multipliers changed without recompiling), :func:`mask_gradients` /
:func:`set_gradient_masks`, :func:`make_optimizer` (AdamW / SGD / Adafactor).

Design notes: docs/training.md ("Optimizers").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mechinterp.train.mesh import path_str

Groups = Sequence[tuple[str, Any]]

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd", "adafactor")


def lr_schedule(name: str, peak: float, *, warmup_steps: int = 0, total_steps: int = 1,
                end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then ``name``:

    ``'cosine'`` / ``'linear'`` decay to ``peak * end_factor`` at ``total_steps``;
    ``'constant'`` stays at ``peak``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be between 0 and total_steps={total_steps}"
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_factor)
    elif name == "linear":
        after = optax.linear_schedule(peak, peak * end_factor, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


# ---------------------------------------------------------------------------------------
# Parameter groups by path pattern.


def _as_pairs(groups: Mapping[str, Any] | Groups) -> list[tuple[str, Any]]:
    return list(groups.items()) if isinstance(groups, Mapping) else [tuple(g) for g in groups]


def _match(path: str, pairs: list[tuple[str, Any]], used: set[str]):
    for pattern, value in pairs:
        if re.search(pattern, path):
            used.add(pattern)
            return True, value
    return False, None


def _check_used(pairs, used: set[str], paths: list[str], what: str) -> None:
    unused = [pattern for pattern, _ in pairs if pattern not in used]
    if unused:
        sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
        raise ValueError(
            f"{what} pattern(s) {unused} match no parameter path; paths look like: {sample}"
        )


def _paths(tree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def label_params(params, groups: Mapping[str, str] | Groups, default: str,
                 what: str = "group") -> Any:
    """A tree of labels: the label of the first pattern matching each path, or ``default``."""
    pairs, used = _as_pairs(groups), set()

    def label(path, _):
        hit, value = _match(path_str(path), pairs, used)
        return value if hit else default

    labels = jax.tree.map_with_path(label, params)
    _check_used(pairs, used, _paths(params), what)
    return labels


def freeze(tx: optax.GradientTransformation, patterns: Sequence[str]
           ) -> optax.GradientTransformation:
    """``tx`` for every parameter except those matching ``patterns``, which never move.

    Frozen parameters get zero updates and no optimizer state (no Adam moments).
    """
    patterns = list(patterns)
    if not patterns:
        return tx

    def labels(params):
        return label_params(params, [(p, "frozen") for p in patterns], "train",
                            what="freeze")

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------------------
# Per-leaf values carried in the optimizer state.


class MultiplierState(NamedTuple):
    """Per-leaf update multipliers (see :func:`scale_by_multipliers`)."""

    multipliers: Any


class GradientMaskState(NamedTuple):
    """Per-leaf gradient masks (see :func:`mask_gradients`)."""

    masks: Any


def _check_broadcast(path: str, value, param, what: str) -> None:
    shape = jnp.shape(value)
    try:
        ok = jnp.broadcast_shapes(shape, param.shape) == tuple(param.shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{what} for {path!r} has shape {shape}, which does not broadcast to the "
            f"parameter's shape {tuple(param.shape)}"
        )


def _state_scale(state_cls, groups, what: str) -> optax.GradientTransformation:
    """Multiply updates by per-leaf values kept in ``state_cls`` (initialized from groups).

    Leaves no pattern matches get the scalar 1.0.
    """
    pairs = _as_pairs(groups)

    def init(params):
        used: set[str] = set()

        def value(path, param):
            hit, v = _match(path_str(path), pairs, used)
            v = jnp.asarray(v if hit else 1.0, jnp.float32)
            _check_broadcast(path_str(path), v, param, what)
            return v

        values = jax.tree.map_with_path(value, params)
        _check_used(pairs, used, _paths(params), what)
        return state_cls(values)

    def update(updates, state, params=None):
        del params
        scaled = jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, state[0])
        return scaled, state

    return optax.GradientTransformation(init, update)


def scale_by_multipliers(groups: Mapping[str, Any] | Groups = ()
                         ) -> optax.GradientTransformation:
    """Multiply each leaf's update by a multiplier carried in the state.

    ``groups``: ``{pattern: multiplier}`` (or pairs); a multiplier is a scalar or an array
    broadcasting to the parameter. Unmatched leaves start at 1. Chained after the learning
    rate, these are per-group learning-rate multipliers; change them during training with
    :func:`set_multipliers` (same shapes, so the jitted step is not recompiled).
    """
    return _state_scale(MultiplierState, groups, "learning-rate multiplier")


def mask_gradients(masks: Mapping[str, Any] | Groups = ()) -> optax.GradientTransformation:
    """Multiply gradients by per-leaf masks carried in the state (1 = keep, 0 = drop).

    ``masks``: ``{pattern: mask}`` with each mask a scalar or an array broadcasting to the
    parameter (e.g. per-neuron). Put it first in a chain, so clipping and moment estimates
    see masked gradients. Note that with momentum or weight decay a masked entry can still
    move; use :func:`freeze` to pin parameters. Change masks with
    :func:`set_gradient_masks`.
    """
    return _state_scale(GradientMaskState, masks, "gradient mask")


def _replace_in_state(opt_state, state_cls, values: Mapping[str, Any], what: str):
    pairs = _as_pairs(values)
    used: set[str] = set()
    found = []

    def new_leaf(path, old):
        hit, v = _match(path_str(path), pairs, used)
        if not hit:
            return old
        v = jnp.asarray(v, jnp.float32)
        if v.shape != old.shape:
            raise ValueError(
                f"new {what} for {path_str(path)!r} has shape {v.shape}, but the state holds "
                f"shape {old.shape}; keep the shape (a new shape would recompile the step)"
            )
        return jax.device_put(v, old.sharding) if isinstance(old, jax.Array) else v

    def replace(node):
        if not isinstance(node, state_cls):
            return node
        found.append(node)
        return state_cls(jax.tree.map_with_path(new_leaf, node[0]))

    new_state = jax.tree.map(replace, opt_state, is_leaf=lambda x: isinstance(x, state_cls))
    if not found:
        raise ValueError(
            f"the optimizer state has no {state_cls.__name__}; build the optimizer with "
            f"{'scale_by_multipliers' if state_cls is MultiplierState else 'mask_gradients'}"
        )
    _check_used(pairs, used, _paths(found[0][0]), what)
    return new_state


def set_multipliers(opt_state, values: Mapping[str, Any] | Groups):
    """A copy of ``opt_state`` with the multipliers of leaves matching each pattern replaced.

    ``values``: ``{pattern: multiplier}``; each new value must have the shape of the old one.
    """
    return _replace_in_state(opt_state, MultiplierState, values, "learning-rate multiplier")


def set_gradient_masks(opt_state, values: Mapping[str, Any] | Groups):
    """A copy of ``opt_state`` with the gradient masks of matching leaves replaced."""
    return _replace_in_state(opt_state, GradientMaskState, values, "gradient mask")


def get_multipliers(opt_state) -> Any:
    """The multiplier tree held in ``opt_state``."""
    found = []
    jax.tree.map(lambda n: found.append(n) if isinstance(n, MultiplierState) else None,
                 opt_state, is_leaf=lambda x: isinstance(x, MultiplierState))
    if not found:
        raise ValueError("the optimizer state has no MultiplierState")
    return found[0].multipliers


# ---------------------------------------------------------------------------------------
# Optimizers.


def _decay_mask(params):
    """Weight decay on matrices only (not on norm scales, biases or other vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    freeze_patterns: Sequence[str] = (),
    lr_multipliers: Mapping[str, Any] | Groups = (),
    gradient_masks: Mapping[str, Any] | Groups | None = None,
) -> optax.GradientTransformation:
    """An optimizer assembled from composable optax transforms, in this order::

        [mask_gradients] -> clip_by_global_norm -> adam | trace | factored rms
          -> decoupled weight decay (matrices) -> learning rate -> scale_by_multipliers

    wrapped in :func:`freeze` for ``freeze_patterns``. ``name``: ``'adamw'``, ``'sgd'``
    (momentum if > 0) or ``'adafactor'`` (factored second moments, no momentum).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    parts = []
    if gradient_masks is not None:
        parts.append(mask_gradients(gradient_masks))
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if name == "adamw":
        parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    elif name == "sgd" and momentum:
        parts.append(optax.trace(decay=momentum))
    elif name == "adafactor":
        parts.append(optax.scale_by_factored_rms())
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    parts.append(scale_by_multipliers(lr_multipliers))
    return freeze(optax.chain(*parts), freeze_patterns)

