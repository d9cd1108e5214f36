"""Meshes and the logical-axis rules: one table maps each logical axis to mesh axes.

Every mesh has the axes ``MESH_AXES`` = (``data``, ``fsdp``, ``tensor``, ``expert``).
Models name their parameters' axes logically (``nn.with_logical_partitioning``);
``DEFAULT_RULES`` maps each logical name to mesh axes, and a batch is split along those of
``'batch'``. Training (:mod:`mechinterp.train.mesh`, which re-exports these) and the
sharded sweeps (:mod:`mechinterp.sweep_mesh`) both use this module: one mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

MeshAxes = Union[str, tuple[str, ...], None]
Rules = Sequence[tuple[str, MeshAxes]]

# Logical name -> mesh axes. Every logical name a model uses must appear here (``None``
# means replicated); the batch is split over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("layers", None),
    ("length", None),
)


def mesh_shape(sizes: Mapping[str, int] | None, n_devices: int) -> dict[str, int]:
    """Resolve axis sizes: missing axes are 1, one axis may be -1 (fills the rest)."""
    sizes = dict(sizes or {"data": -1})
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in shape.items() if size == -1]
    bad = [axis for axis, size in shape.items() if size == 0 or size < -1]
    if bad or len(fill) > 1:
        raise ValueError(
            f"mesh sizes {shape}: each axis needs a positive size, and at most one axis "
            "may be -1 (it takes the remaining devices)"
        )
    known = math.prod(size for size in shape.values() if size != -1)
    if n_devices % known:
        raise ValueError(
            f"mesh sizes {shape} multiply to {known}, which does not divide the "
            f"{n_devices} devices; pick sizes whose product divides {n_devices}"
        )
    if fill:
        shape[fill[0]] = n_devices // known
    elif known != n_devices:
        raise ValueError(
            f"mesh sizes {shape} use {known} of {n_devices} devices; set one axis to -1 "
            "to use all of them, or pass devices= explicitly"
        )
    return shape


def make_mesh(sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over axes ``data, fsdp, tensor, expert`` (all ``AxisType.Auto``).

    ``sizes`` maps axis names to sizes; missing axes are 1, one may be -1 to take the
    remaining devices (default: everything on ``data``). ``devices`` defaults to all.
    Use it with ``jax.set_mesh(mesh)`` (a context manager) around training code.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def _as_axes(value: MeshAxes) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_rules(rules: Rules, mesh: Mesh) -> tuple[tuple[str, MeshAxes], ...]:
    """Validate a rules table against ``mesh``; return it as a tuple of pairs.

    Each rule is ``(logical_name, mesh_axes)`` with ``mesh_axes`` a mesh axis name, a tuple
    of them, or ``None`` (replicated). Naming an axis the mesh lacks is an error.
    """
    checked = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"rule {rule!r} must be a pair (logical_name, mesh_axes)")
        name, axes = rule[0], rule[1]
        if isinstance(axes, list):
            axes = tuple(axes)
        unknown = [a for a in _as_axes(axes) if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"rule {name!r} -> {axes!r} names mesh axes {unknown} that the mesh does not "
                f"have; mesh axes are {tuple(mesh.axis_names)}"
            )
        checked.append((name, axes))
    return tuple(checked)


def _rule_names(rules: Rules) -> set[str]:
    return {name for name, _ in rules}


def logical_to_spec(logical: PartitionSpec | Sequence[str | None], rules: Rules,
                    where: str = "an array") -> PartitionSpec:
    """Mesh ``PartitionSpec`` for one array with logical axis names ``logical``.

    Every logical name must have a rule (Flax would silently replicate unknown names).
    When two dimensions map to the same mesh axis, the earlier rule wins and the other
    dimension is replicated.
    """
    names = [n for n in logical if n is not None]
    missing = sorted(set(names) - _rule_names(rules))
    if missing:
        raise ValueError(
            f"{where} has logical axes {missing} that no rule maps; add e.g. "
            f"({missing[0]!r}, None) to the rules to replicate it, or name mesh axes"
        )
    return nn.logical_to_mesh_axes(tuple(logical), tuple(rules))


def path_str(path) -> str:
    """``'layers/attn/wq'`` for a pytree key path."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def check_divisible(shapes, specs, mesh: Mesh, what: str = "parameter") -> None:
    """Raise if some dimension is not divisible by the mesh axes it is sharded over."""
    sizes = dict(mesh.shape)

    def check(path, leaf, spec):
        for dim, (length, axes) in enumerate(zip(leaf.shape, spec)):
            parts = math.prod(sizes[a] for a in _as_axes(axes))
            if length % parts:
                raise ValueError(
                    f"{what} {path_str(path)!r} of shape {tuple(leaf.shape)} is sharded "
                    f"over mesh axes {axes!r} ({parts} ways) along dimension {dim} of "
                    f"length {length}, which does not divide; change the mesh sizes or "
                    "the rule for that logical axis"
                )

    jax.tree.map_with_path(check, shapes, specs,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(rules: Rules) -> PartitionSpec:
    """The spec of a batch: leading axis split as the logical name ``'batch'`` says."""
    return logical_to_spec(("batch",), rules, where="the batch")


def input_specs(inputs: Sequence[Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shape-only versions of the model inputs, with batch size 1 (enough for init)."""
    return tuple(jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype) for x in inputs)


def zeros(specs):
    return tuple(jnp.zeros(s.shape, s.dtype) for s in specs)


def logical_param_specs(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """Logical ``PartitionSpec`` of every parameter (``P()`` where none is declared)."""
    specs = input_specs(inputs)
    key = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, *zeros(specs)))
    return nn.get_partition_spec(boxed["params"])
