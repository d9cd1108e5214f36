"""Importance of layers and units: masking sweeps, |grad x theta|, mask gradients.

A *unit* is a slice of an output projection along a ``unit axis`` (an attention head of
``wo``, an FFN neuron of ``down``); ``spec = {pattern: unit_axis}`` names them. A
multiplicative mask ``m`` (shape ``kernel.shape[:unit_axis + 1]``, 1 = kept) scales each
unit's outgoing weights, so ``m = 0`` removes the unit's (and with every unit, the layer's)
contribution to the residual stream. Estimators:

- :func:`masking_sweep`: ``L(m with a group zeroed) - L(1)``, all groups in one ``vmap``.
- :func:`mask_gradient`: ``|dL/dm|`` at ``m = 1`` (Michel et al. 2019, eq. 2), any loss,
  e.g. :func:`self_kl` between two dropout passes (CoFiTune).
- :func:`grad_x_theta`: ``|theta * dL/dtheta|`` summed per leaf or per unit (ADEPT).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from mechinterp.train.mesh import path_str


def _select(params, spec: Mapping[str, int]) -> dict[str, tuple[tuple[int, ...], int]]:
    out, used = {}, set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_str(path)
        for pattern, axis in spec.items():
            if re.search(pattern, name):
                used.add(pattern)
                if not 0 <= axis < leaf.ndim - 1:
                    raise ValueError(f"unit axis {axis} of {name!r} (shape {leaf.shape}) must "
                                     "leave an output axis after it")
                out[name] = (leaf.shape[:axis + 1], axis)
                break
    unused = sorted(set(spec) - used)
    if unused:
        raise ValueError(f"unit pattern(s) {unused} match no parameter")
    return out


def ones_masks(params, spec: Mapping[str, int]) -> dict[str, jax.Array]:
    """All-ones masks ``{path: (kernel.shape[:unit_axis + 1])}``."""
    return {k: jnp.ones(shape, jnp.float32) for k, (shape, _) in _select(params, spec).items()}


def apply_masks(params, masks: Mapping[str, jax.Array]):
    """``params`` with each masked kernel's units scaled by its mask (traceable)."""
    def scale(path, leaf):
        m = masks.get(path_str(path))
        if m is None:
            return leaf
        return leaf * m.reshape(m.shape + (1,) * (leaf.ndim - m.ndim)).astype(leaf.dtype)
    return jax.tree.map_with_path(scale, params)


def layer_masks(masks: Mapping[str, jax.Array], layer_axis: int = 0) -> jax.Array:
    """(n_layers, ...) stacked masks: row ``i`` zeroes every unit of layer ``i`` (the
    masks' ``layer_axis``) and keeps the rest; for :func:`masking_sweep`."""
    n = {m.shape[layer_axis] for m in masks.values()}
    if len(n) != 1:
        raise ValueError(f"masks disagree on the number of layers: {sorted(n)}")
    n = n.pop()

    def rows(m):
        keep = 1.0 - jnp.eye(n)  # (which layer is off, layer)
        shape = [1] * m.ndim
        shape[layer_axis] = n
        return jnp.stack([m * keep[i].reshape(shape) for i in range(n)])
    return {k: rows(m) for k, m in masks.items()}


def unit_masks(masks: Mapping[str, jax.Array], path: str) -> dict[str, jax.Array]:
    """Stacked masks zeroing one unit of ``path`` at a time (the others all ones)."""
    m = masks[path]
    off = 1.0 - jnp.eye(m.size).reshape((m.size, *m.shape))
    return {k: (off if k == path else jnp.broadcast_to(v, (m.size, *v.shape)))
            for k, v in masks.items()}


def masking_sweep(loss_fn: Callable, params, stacked: Mapping[str, jax.Array],
                  batch_size: int | None = None) -> jax.Array:
    """``loss_fn(masked params) - loss_fn(params)`` for each row of ``stacked`` (from
    :func:`layer_masks` / :func:`unit_masks`), vmapped (in chunks of ``batch_size``)."""
    base = loss_fn(params)
    losses = jax.lax.map(lambda m: loss_fn(apply_masks(params, m)), dict(stacked),
                         batch_size=batch_size)
    return losses - base


def mask_gradient(loss_fn: Callable, params, masks: Mapping[str, jax.Array]
                  ) -> dict[str, jax.Array]:
    """``|d loss / d m|`` at ``masks`` (usually all ones): one gradient per unit;
    ``loss_fn(masked params, masks)`` may use the masks itself (e.g. for dropout)."""
    grads = jax.grad(lambda m: loss_fn(apply_masks(params, m), m))(dict(masks))
    return jax.tree.map(jnp.abs, grads)


def self_kl(logits_a, logits_b, weight=None):
    """Symmetric KL between two passes' next-token distributions (CoFiTune's loss),
    averaged over positions with ``weight`` (default all)."""
    la, lb = jax.nn.log_softmax(logits_a, -1), jax.nn.log_softmax(logits_b, -1)
    kl = 0.5 * ((jnp.exp(la) * (la - lb)).sum(-1) + (jnp.exp(lb) * (lb - la)).sum(-1))
    weight = jnp.ones(kl.shape) if weight is None else weight
    return (kl * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def dropout_masks(key, masks: Mapping[str, jax.Array], rate: float) -> dict[str, jax.Array]:
    """``masks`` times inverted-dropout noise (Bernoulli keep ``1 - rate``, scaled)."""
    keys = jax.random.split(key, len(masks))
    return {k: m * jax.random.bernoulli(r, 1.0 - rate, m.shape) / (1.0 - rate)
            for r, (k, m) in zip(keys, sorted(masks.items()))}


def grad_x_theta(loss_fn: Callable, params, spec: Mapping[str, int] | None = None):
    """``|theta * dL/dtheta|``: per leaf summed to a scalar, or with ``spec`` summed per
    unit of the selected kernels (``{path: (kernel.shape[:unit_axis + 1])}``)."""
    grads = jax.grad(loss_fn)(params)
    score = jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)
    flat = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(score)}
    if spec is None:
        return {k: s.sum() for k, s in flat.items()}
    return {k: flat[k].sum(axis=tuple(range(len(shape), flat[k].ndim)))
            for k, (shape, _) in _select(params, spec).items()}
