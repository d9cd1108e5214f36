"""ADEPT's two stages on the LLaMA-style decoder (METHODS.md item 6).

Stage 1: layer importance on general data = loss increase when the layer's output
projections are masked (:func:`mechinterp.train.importance.masking_sweep`); the ``k`` least
important layers are duplicated directly after themselves with the copy's ``attn/wo`` and
``mlp/down`` zeroed, so the expanded model computes the base model's function
(:func:`expand`). Stage 2: only the copies train; every N steps each unit (attention head,
FFN neuron) of a copy gets ``I_u = mean(|theta| * mean_batches |grad|)`` on general data and
the learning-rate multiplier ``2 (I_max - I_u) / (I_max - I_min)``
(:func:`unit_importance`, :func:`unit_multipliers`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.models.decoder import unstack_layers
from mechinterp.train import importance as imp

# Unit axis of each per-layer kernel (unrolled layout): heads, then FFN neurons.
HEAD_AXES = {"attn/wq": 1, "attn/wk": 1, "attn/wv": 1, "attn/wo": 0}
NEURON_AXES = {"mlp/gate": 1, "mlp/up": 1, "mlp/down": 0}
SCANNED_UNITS = {"layers/attn/wo$": 1, "layers/mlp/down$": 1}


def layer_importance(loss_fn, params) -> np.ndarray:
    """Loss increase on ``loss_fn``'s data when each layer of a scanned decoder is masked."""
    masks = imp.ones_masks(params, SCANNED_UNITS)
    return np.asarray(imp.masking_sweep(loss_fn, params, imp.layer_masks(masks)))


def expand(model, params, layers):
    """``(model, params, copies)``: the unrolled decoder with a copy of each layer in
    ``layers`` right after it, the copy's ``attn/wo`` and ``mlp/down`` zeroed; ``copies`` are
    the copies' indices in the new model."""
    c = model.config
    bad = [i for i in layers if not 0 <= i < c.n_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers to duplicate must be distinct in 0..{c.n_layers - 1}, "
                         f"got {list(layers)}")
    if c.attn_layers is not None or c.mlp_layers is not None or c.n_experts:
        raise ValueError("expand needs a dense decoder with every sublayer present")
    flat = unstack_layers(params, c.n_layers) if c.scan_layers else dict(params)
    out = {k: v for k, v in flat.items() if not k.startswith("layers_")}
    copies, j = [], 0
    for i in range(c.n_layers):
        out[f"layers_{j}"] = flat[f"layers_{i}"]
        j += 1
        if i in layers:
            layer = jax.tree.map(jnp.array, flat[f"layers_{i}"])
            layer["attn"]["wo"] = jnp.zeros_like(layer["attn"]["wo"])
            layer["mlp"]["down"] = jnp.zeros_like(layer["mlp"]["down"])
            out[f"layers_{j}"] = layer
            copies.append(j)
            j += 1
    config = dataclasses.replace(c, n_layers=j, scan_layers=False)
    return type(model)(config), out, copies


def copy_patterns(copies) -> list[str]:
    return [f"^layers_{j}/" for j in copies]


def _unit_shape(leaf, axis):
    shape = [1] * leaf.ndim
    shape[axis] = leaf.shape[axis]
    return tuple(shape)


def unit_importance(grad_fn, params, copies, batches) -> dict[str, np.ndarray]:
    """Per-copy head and neuron importance ``mean(|theta| * mean_batches |grad|)``:
    ``{"layers_j/heads": (h,), "layers_j/neurons": (m,)}``."""
    mean_abs = None
    for batch in batches:
        g = jax.tree.map(jnp.abs, grad_fn(params, batch))
        mean_abs = g if mean_abs is None else jax.tree.map(jnp.add, mean_abs, g)
    mean_abs = jax.tree.map(lambda x: x / len(batches), mean_abs)
    out = {}
    for j in copies:
        layer, grads = params[f"layers_{j}"], mean_abs[f"layers_{j}"]
        for name, axes in (("heads", HEAD_AXES), ("neurons", NEURON_AXES)):
            per_leaf = []
            for path, axis in axes.items():
                a, b = path.split("/")
                s = jnp.abs(layer[a][b]) * grads[a][b]
                per_leaf.append(s.mean(axis=tuple(i for i in range(s.ndim) if i != axis)))
            out[f"layers_{j}/{name}"] = np.asarray(jnp.mean(jnp.stack(per_leaf), 0))
    return out


def unit_multipliers(importance: dict[str, np.ndarray], params) -> dict[str, np.ndarray]:
    """``{pattern: multiplier array}`` for :func:`mechinterp.train.optim.set_multipliers`:
    ``2 (I_max - I_u) / (I_max - I_min)`` over every unit of every copy (all 1 when equal)."""
    values = np.concatenate(list(importance.values()))
    lo, hi = float(values.min()), float(values.max())
    out = {}
    for key, imp_u in importance.items():
        layer, kind = key.split("/")
        m = np.ones_like(imp_u) if hi == lo else 2.0 * (hi - imp_u) / (hi - lo)
        for path, axis in (HEAD_AXES if kind == "heads" else NEURON_AXES).items():
            a, b = path.split("/")
            leaf = params[layer][a][b]
            out[f"^{layer}/{path}$"] = m.reshape(_unit_shape(leaf, axis)).astype(np.float32)
    return out


def initial_multipliers(params, copies) -> dict[str, np.ndarray]:
    """All-ones multipliers with the shapes :func:`unit_multipliers` returns."""
    out = {}
    for j in copies:
        for axes in (HEAD_AXES, NEURON_AXES):
            for path, axis in axes.items():
                a, b = path.split("/")
                out[f"^layers_{j}/{path}$"] = np.ones(
                    _unit_shape(params[f"layers_{j}"][a][b], axis), np.float32)
    return out


def copy_ablation(loss_fns: dict, params, copies) -> dict[str, list[float]]:
    """Loss increase on each of ``loss_fns`` when each copy's output projections are zeroed
    (the copy made identity again): where the tuned knowledge sits."""
    spec = {f"^layers_{j}/{p}$": 0 for j in copies for p in ("attn/wo", "mlp/down")}
    masks = imp.ones_masks(params, spec)
    out = {}
    for name, fn in loss_fns.items():
        deltas = []
        for j in copies:
            off = {k: (jnp.zeros_like(m) if k.startswith(f"layers_{j}/") else m)[None]
                   for k, m in masks.items()}
            deltas.append(float(_sweep(fn)(params, off)[0]))
        out[name] = deltas
    return out


@functools.cache
def _sweep(loss_fn):
    """:func:`~mechinterp.train.importance.masking_sweep` of ``loss_fn``, compiled once."""
    return jax.jit(lambda params, stacked: imp.masking_sweep(loss_fn, params, stacked))
