"""Parameter-efficient tuning for any family: LoRA, bias-only, unit masks, threshold gates.

LoRA (Hu et al. 2021, eq. 3): ``W' = W + (alpha / r) A B`` with ``A`` (in, r) random and
``B`` (r, out) zero, so the adapted model starts equal to the base. Kernels are chosen by
path pattern; a kernel's axes are ``batch_dims`` leading axes (e.g. a scanned layer axis),
then ``in_dims`` input axes, then output axes. :func:`lora_params` adds the deltas inside
the forward (unmerged); :func:`merge` bakes them into the weights once.
Trainable parts are path-pattern subsets: :func:`peft_optimizer` wraps any optax transform
so only they move (composes with train/optim's groups, multipliers and masks);
:func:`save_trainable` / :func:`restore_trainable` checkpoint only them with Orbax.
:func:`threshold_gate` is the Dopamine-style gate (models/kernels/gating.threshold_gain).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from mechinterp.models.kernels.gating import threshold_gain
from mechinterp.train.checkpoint import Checkpointer
from mechinterp.train.mesh import path_str
from mechinterp.train.optim import label_params

# Leaf names that are biases in the model families here (qwen's bq/bk/bv, MLP/ViT biases).
BIAS_PATTERNS = (r"(^|/)b[qkv]$", r"bias$")


def _leaves(params) -> dict[str, jax.Array]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _nest(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def _targets(params, targets: Mapping[str, tuple[int, int]]) -> dict[str, tuple]:
    """``{path: (leaf, batch_dims, in_dims)}`` of the kernels the patterns select."""
    chosen, used = {}, set()
    for path, leaf in _leaves(params).items():
        for pattern, (batch_dims, in_dims) in targets.items():
            if re.search(pattern, path):
                used.add(pattern)
                if leaf.ndim < batch_dims + in_dims + 1:
                    raise ValueError(
                        f"LoRA target {path!r} has shape {leaf.shape}: too few axes for "
                        f"batch_dims={batch_dims} + in_dims={in_dims} + an output axis")
                chosen[path] = (leaf, batch_dims, in_dims)
                break
    unused = sorted(set(targets) - used)
    if unused:
        raise ValueError(f"LoRA pattern(s) {unused} match no parameter; paths look like: "
                         f"{', '.join(list(_leaves(params))[:6])}, ...")
    return chosen


def lora_init(params, targets: Mapping[str, tuple[int, int]], rank: int, key) -> dict:
    """Adapters ``{..path..: {"a", "b"}}`` (nested like ``params``) for the kernels matching
    ``targets`` (``{pattern: (batch_dims, in_dims)}``): ``a`` (*batch, in, r) with
    N(0, 1/in) entries, ``b`` (*batch, r, out) zeros."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    flat = {}
    chosen = _targets(params, targets)
    for k, (path, (leaf, nb, ni)) in zip(jax.random.split(key, len(chosen)), chosen.items()):
        batch = leaf.shape[:nb]
        n_in = math.prod(leaf.shape[nb:nb + ni])
        n_out = math.prod(leaf.shape[nb + ni:])
        a = jax.random.normal(k, (*batch, n_in, rank), leaf.dtype) / math.sqrt(n_in)
        flat[path] = {"a": a, "b": jnp.zeros((*batch, rank, n_out), leaf.dtype)}
    return _nest(flat)


def _adapter_leaves(adapter) -> dict[str, dict]:
    flat = {}
    for path, leaf in _leaves(adapter).items():
        owner, _, which = path.rpartition("/")
        flat.setdefault(owner, {})[which] = leaf
    return flat


def lora_delta(a, b, shape, scale: float = 1.0):
    """``scale * a @ b`` reshaped to the kernel's ``shape`` (batch axes broadcast)."""
    return (scale * jnp.matmul(a, b)).reshape(shape)


def lora_params(params, adapter, alpha: float = 1.0, sign: float = 1.0):
    """``params`` with ``sign * (alpha / r) A B`` added to every adapted kernel (traceable:
    call it inside the jitted loss to train the adapter unmerged)."""
    flat = _adapter_leaves(adapter)

    def add(path, leaf):
        ab = flat.get(path_str(path))
        if ab is None:
            return leaf
        scale = sign * alpha / ab["a"].shape[-1]
        return leaf + lora_delta(ab["a"], ab["b"], leaf.shape, scale).astype(leaf.dtype)

    missing = sorted(set(flat) - set(_leaves(params)))
    if missing:
        raise ValueError(f"adapter kernels {missing} are not in the parameters")
    return jax.tree.map_with_path(add, params)


def merge(params, adapter, alpha: float = 1.0):
    """The adapted weights as plain parameters (no extra work at inference)."""
    return jax.jit(lora_params, static_argnums=(2,))(params, adapter, alpha)


def unmerge(merged, adapter, alpha: float = 1.0):
    """The base weights back from :func:`merge`'s output (to float rounding)."""
    return lora_params(merged, adapter, alpha, sign=-1.0)


def lora_size(adapter) -> int:
    return sum(x.size for x in jax.tree.leaves(adapter))


# --------------------------------------------------------------------------- trainable parts


def bias_patterns(params) -> list[str]:
    """The bias-only (BitFit) trainable set: patterns of the bias leaves present."""
    paths = list(_leaves(params))
    found = [p for p in BIAS_PATTERNS if any(re.search(p, q) for q in paths)]
    if not found:
        raise ValueError(f"no bias parameters (patterns {BIAS_PATTERNS}); paths look like: "
                         f"{', '.join(paths[:6])}, ...")
    return found


def trainable_mask(params, patterns: Sequence[str]):
    """A bool tree: True where a path matches one of ``patterns`` (each must match)."""
    labels = label_params(params, [(p, True) for p in patterns], False, what="trainable")
    return jax.tree.map(bool, labels)


def peft_optimizer(tx: optax.GradientTransformation, patterns: Sequence[str]
                   ) -> optax.GradientTransformation:
    """``tx`` on the parameters matching ``patterns``; all others get zero updates and no
    optimizer state. ``tx`` may be any chain (train/optim's groups and masks included)."""
    patterns = list(patterns)
    if not patterns:
        raise ValueError("peft_optimizer needs at least one trainable pattern")

    def labels(params):
        return label_params(params, [(p, "train") for p in patterns], "frozen",
                            what="trainable")

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def trainable_part(params, patterns: Sequence[str]) -> dict:
    """The sub-tree of ``params`` matching ``patterns`` (nested like ``params``)."""
    mask = _leaves(trainable_mask(params, patterns))
    return _nest({p: v for p, v in _leaves(params).items() if mask[p]})


def with_part(params, part):
    """``params`` with the leaves of ``part`` (a :func:`trainable_part`) put back."""
    flat = _leaves(part)
    extra = sorted(set(flat) - set(_leaves(params)))
    if extra:
        raise ValueError(f"{extra} are not parameters of the model")
    return jax.tree.map_with_path(lambda p, v: flat.get(path_str(p), v), params)


def trainable_fraction(params, part) -> float:
    total = sum(x.size for x in jax.tree.leaves(params))
    return sum(x.size for x in jax.tree.leaves(part)) / total


def save_trainable(directory: str | Path, part, step: int = 0) -> None:
    """Write only the trainable ``part`` (adapter, biases, gates...) as an Orbax checkpoint."""
    with Checkpointer(directory, keep=1, async_save=False) as ckpt:
        ckpt.save(step, part, force=True)


def restore_trainable(directory: str | Path, like, step: int | None = None):
    """The part saved by :func:`save_trainable`, shaped like ``like`` (shapes are checked)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    with Checkpointer(directory, keep=1, async_save=False) as ckpt:
        return ckpt.restore(abstract, step=step)


# --------------------------------------------------------------------------- gates


def threshold_gate(h, tau, gain, temperature: float = 1.0, hard: bool = False):
    """Per-neuron gate ``gain * h * sigmoid((h - tau) / T)`` (training), or
    ``gain * h * 1[h > tau]`` (``hard``, inference); ``tau`` and ``gain`` broadcast along
    the last (neuron) axis. With a scalar, non-traced ``tau`` this is the gating kernel
    (:func:`~mechinterp.models.kernels.gating.threshold_gain`); per-neuron learned
    thresholds need d/d tau, which that kernel (static ``tau``) does not give, so they use
    the same formula in jnp."""
    if isinstance(tau, (int, float)):
        return threshold_gain(jnp.broadcast_to(gain, h.shape).astype(h.dtype), h, tau,
                              temperature, hard)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    gate = (h > tau).astype(h.dtype) if hard else jax.nn.sigmoid((h - tau) / temperature)
    return gain * h * gate
