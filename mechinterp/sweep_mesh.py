"""Sweeps over a device mesh: where each operand of a sharded sweep, capture or ablation lives.

Cells are a batch: split over the mesh axes of the logical name ``'batch'``
(``DEFAULT_RULES``: ``data`` and ``fsdp``), as training splits its batch. Parameters are
sharded by the model's logical axes under the same rules (FSDP / tensor / expert), every
other shared operand (source cache, tokens, resume state) is replicated, and each cell's
value comes back replicated, in grid order, to every process. Under
``jax.distributed.initialize()`` every process makes the same call; each computes its own
devices' cells. Notes: ``docs/sharded_sweeps.md``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mechinterp.sharding import (DEFAULT_RULES, _as_axes, batch_spec, check_divisible,
                                 check_rules, logical_param_specs, logical_to_spec,
                                 make_mesh, path_str)


class Placement:
    """A mesh and its rules, and how a sweep's operands are laid out on it.

    ``mesh``: a :class:`jax.sharding.Mesh` or axis sizes for
    :func:`mechinterp.sharding.make_mesh` (e.g. ``{"data": -1}``); ``rules`` default to
    ``DEFAULT_RULES``. An axis the rules name but the mesh lacks, or sizes that do not
    divide the devices, raise here, before anything compiles.
    """

    def __init__(self, mesh: Mesh | Mapping[str, int], rules=None):
        if isinstance(mesh, Mapping):
            mesh = make_mesh(mesh)
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or a dict of axis sizes "
                            f"(e.g. {{'data': -1}}), got {type(mesh).__name__}")
        self.mesh = mesh
        self.rules = check_rules(DEFAULT_RULES if rules is None else rules, mesh)
        self.cell_axes = _as_axes(batch_spec(self.rules)[0])
        self.ways = math.prod(mesh.shape[a] for a in self.cell_axes)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.split = NamedSharding(mesh, PartitionSpec(self.cell_axes or None))

    def __repr__(self) -> str:
        return f"Placement({dict(self.mesh.shape)}, cells over {self.cell_axes})"

    def put(self, x, sharding: NamedSharding, what: str):
        """``x`` laid out as ``sharding``. A host or one-device array is copied there (each
        process its own devices' part); an array over another mesh is an error."""
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            if x.sharding.device_set != set(self.mesh.devices.flat):
                raise ValueError(
                    f"{what} is sharded over devices {_ids(x.sharding.device_set)}, but the "
                    f"sweep's mesh holds devices {_ids(self.mesh.devices.flat)}: pass it on "
                    "this mesh (the same mesh= for capture and sweep) or as a host array "
                    "(np.asarray)")
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(
                x, sharding)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def cells(self, items):
        """A chunk of cells (a pytree, leading axis a multiple of ``ways``), split."""
        return jax.tree.map(lambda x: self.put(x, self.split, "a chunk of cells"), items)

    def replicate(self, tree, what: str):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.put(x, self.replicated, f"{what} {path_str(path)}".strip())
            if hasattr(x, "shape") else x, tree)

    def batch(self, tree, what: str):
        """Each leaf split over the batch axes where its leading size divides by ``ways``,
        else replicated (a capture's inputs)."""
        def put(path, x):
            if not hasattr(x, "shape"):  # a static keyword (a flag, a Python number)
                return x
            split = np.ndim(x) > 0 and np.shape(x)[0] % self.ways == 0
            return self.put(x, self.split if split else self.replicated,
                            f"{what} {path_str(path)}".strip())

        return jax.tree_util.tree_map_with_path(put, tree)

    def call(self, model, params, inputs, kwargs, interventions):
        """A forward's operands (a capture's): params by the rules, inputs split over the
        batch axes where their batch divides by ``ways`` (else replicated)."""
        inputs, kwargs = self.batch((tuple(inputs), kwargs), "the inputs")
        return (self.params(model, params, inputs), inputs, kwargs,
                self.replicate(interventions, "the interventions"))

    def params(self, model, params, inputs: Sequence[Any]):
        """``params`` sharded as the model's logical axes and the rules say (parameters
        without logical axes are replicated); a dimension that does not divide raises."""
        from mechinterp.site_io import _hashable  # site_io imports this module

        specs = tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in inputs
                      if hasattr(x, "shape"))
        logical = (_logical_specs(model, specs) if _hashable(model)
                   else logical_param_specs(model, specs))
        specs = jax.tree_util.tree_map_with_path(
            lambda path, spec: logical_to_spec(spec, self.rules,
                                               where=f"parameter {path_str(path)!r}"),
            logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
        flat_specs = dict(_flat(specs))
        flat_params = _flat(params)
        missing = sorted(set(flat_specs) ^ {path for path, _ in flat_params})
        if missing:
            raise ValueError(f"params do not match the model's parameters at {missing[:3]}: "
                             "pass this model's params")
        for path, leaf in flat_params:
            check_divisible({path: leaf}, {path: flat_specs[path]}, self.mesh)
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.put(x, NamedSharding(self.mesh, flat_specs[path_str(path)]),
                                     f"parameter {path_str(path)!r}"), params)

    def check_same_grid(self, *description) -> None:
        """Every process must sweep the same grid: compare a digest of ``description``
        (site, axes, shape, options, inputs and source) across processes before any compute."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        digest = hashlib.sha256(repr(description).encode()).digest()[:8]
        mine = np.frombuffer(digest, np.int64)
        every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
        differ = [p for p, d in enumerate(every) if d != every[0]]
        if differ:
            raise ValueError(
                f"process {jax.process_index()}: processes {differ} sweep a different grid "
                f"than process 0 (this one: {description!r}); under jax.distributed every "
                "process must make the same call with the same inputs")


def placement(mesh, rules=None) -> Placement | None:
    """``None`` without a mesh (the one-device path), else a :class:`Placement`."""
    if mesh is None:
        if rules is not None:
            raise ValueError("rules= given without mesh=: pass mesh= too (e.g. {'data': -1})")
        return None
    return mesh if isinstance(mesh, Placement) else Placement(mesh, rules)


def on_mesh(mesh, rules=None):
    """:meth:`Placement.call` for ``mesh`` (``None``: the operands as they are)."""
    place = placement(mesh, rules)
    if place is None:
        return lambda model, params, inputs, kwargs, interventions: (
            params, tuple(inputs), kwargs, interventions)
    return place.call


@functools.lru_cache(maxsize=32)
def _logical_specs(model, specs):
    return logical_param_specs(model, specs)


def _flat(tree) -> list:
    return [(path_str(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, PartitionSpec))]


def _ids(devices) -> list[int]:
    return sorted(d.id for d in devices)


def grid_digest(inputs, kwargs) -> tuple:
    """Shapes, dtypes and (host-visible) values of a sweep's inputs, for
    :meth:`Placement.check_same_grid`."""
    out = []
    for x in jax.tree.leaves((tuple(inputs), dict(kwargs))):
        visible = not isinstance(x, jax.Array) or x.is_fully_addressable
        value = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16] if (
            visible and np.size(x) <= 2**22) else None
        out.append((np.shape(x), str(getattr(x, "dtype", type(x).__name__)), value))
    return tuple(out)
