"""Device meshes and the logical-axis rules that shard parameters, state and batches.

Every mesh has the axes ``MESH_AXES`` = (``data``, ``fsdp``, ``tensor``, ``expert``): pure
data parallelism, ZeRO-3 style sharded data parallelism, tensor parallelism and expert
parallelism. Models name their parameters' axes logically (``nn.with_logical_partitioning``);
one rules table (``DEFAULT_RULES``, defined in :mod:`mechinterp.sharding`) maps each
logical name to mesh axes, and the batch is split along those of ``'batch'``.

Key names: :func:`make_mesh`, :func:`logical_to_spec`, :func:`batch_sharding`,
:func:`global_batch`. Multi-host: call ``jax.distributed.initialize()`` first in every
process, then build the mesh over ``jax.devices()``.

Design notes (launching on SLURM and TPU pods): docs/training.md ("Meshes").
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The rules and meshes live in the core (the sweeps shard by them too); re-exported here.
from mechinterp.sharding import (DEFAULT_RULES, MESH_AXES, MeshAxes, Rules,  # noqa: F401
                                 _as_axes, batch_spec, check_divisible, check_rules,
                                 logical_to_spec, make_mesh, mesh_shape, path_str)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split."""
    axes = batch_spec(rules)[0]
    return math.prod(mesh.shape[a] for a in _as_axes(axes))


def check_batch_size(batch_size: int, mesh: Mesh, rules: Rules, grad_accum: int = 1) -> None:
    """Raise unless the global batch splits evenly over the batch axes (and microbatches)."""
    ways = data_parallel_size(mesh, rules)
    if batch_size % (ways * grad_accum):
        raise ValueError(
            f"batch size {batch_size} is not divisible by {ways * grad_accum} = "
            f"{ways} (mesh axes {batch_spec(rules)[0]!r} that split the batch) x "
            f"{grad_accum} (gradient accumulation steps); use a multiple of "
            f"{ways * grad_accum}"
        )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding for every array of a batch (leading axis split, the rest replicated)."""
    return NamedSharding(mesh, batch_spec(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh: Mesh, rules: Rules):
    """Assemble this host's share of a batch (numpy) into global ``jax.Array`` s.

    On one host the local batch is the whole batch; on several hosts each passes its own
    rows (in process order) and the result spans all of them.
    """
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch)
