"""Grouped matrix multiplication over experts: the matmul of dropless MoE execution.

``lhs`` (M, K) holds token rows sorted by expert, ``rhs`` (E, K, N) one matrix per expert and
``group_sizes`` (E,) how many consecutive rows each expert owns (the router's dispatch plan,
:class:`~mechinterp.models.kernels.router.RoutingPlan`)::

    out[r] = lhs[r] @ rhs[g(r)],  g(r) = the group whose rows [offset_g, offset_g + size_g)
                                  contain r;  rows past sum(group_sizes) are 0.

Implementations (all differentiable in ``lhs`` and ``rhs``):

- :func:`gmm_reference`: a loop over experts, each a full ``lhs @ rhs[e]`` masked to its
  rows (``E`` times the FLOPs; the plain-``jnp`` reference).
- :func:`gmm_ragged`: :func:`jax.lax.ragged_dot` (XLA's grouped matmul; its transpose rules
  give the gradients).
- :func:`gmm_megablox`: ``jax.experimental.pallas.ops.tpu.megablox.gmm``, the TPU Pallas
  kernel with its ``custom_vjp`` (``tgmm`` for ``d rhs``). Tested here only with
  ``interpret=True`` on CPU; never run on a TPU here.

:func:`gmm` dispatches: megablox on TPU, ``ragged_dot`` elsewhere (GPU included). The GPU
choice is not backed by a GPU measurement (no GPU was available in this session;
``benchmarks/moe_kernels.py`` measures it against a dense matmul of the same FLOPs on a GPU).
No separate Pallas GPU grouped-matmul kernel is written: megablox is the Pallas kernel here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

Array = jax.Array
IMPLS = ("megablox", "ragged", "reference")


def check_gmm_args(lhs: Array, rhs: Array, group_sizes: Array) -> None:
    """Raise ``ValueError`` unless ``lhs`` (M, K), ``rhs`` (E, K, N), ``group_sizes`` (E,)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"grouped matmul needs lhs (M, K), rhs (E, K, N) and group_sizes "
                         f"(E,); got {lhs.shape}, {rhs.shape} and {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs has K={lhs.shape[1]} columns but rhs has K={rhs.shape[1]}")


def row_groups(group_sizes: Array, n_rows: int) -> Array:
    """The group of every row (``E`` for rows past ``sum(group_sizes)``)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(n_rows), side="right")


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Loop over experts: ``sum_e 1[g(r) = e] * (lhs @ rhs[e])`` (float32 accumulation)."""
    check_gmm_args(lhs, rhs, group_sizes)
    groups = row_groups(group_sizes, lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for e in range(rhs.shape[0]):
        full = jnp.dot(lhs, rhs[e], preferred_element_type=jnp.float32)
        out = out + jnp.where((groups == e)[:, None], full, 0.0)
    return out.astype(lhs.dtype)


def gmm_ragged(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """:func:`jax.lax.ragged_dot` (float32 accumulation, output in ``lhs.dtype``)."""
    check_gmm_args(lhs, rhs, group_sizes)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def gmm_megablox(lhs: Array, rhs: Array, group_sizes: Array, tile_rows: int = 128) -> Array:
    """The megablox TPU kernel (``interpret=True`` on CPU; never run on a TPU here).

    Rows are padded to a multiple of the row tile; ``K`` and ``N`` are single tiles unless
    they are multiples of 128 (then 128-wide tiles, the TPU lane width).
    """
    check_gmm_args(lhs, rhs, group_sizes)
    m, k = lhs.shape
    n = rhs.shape[2]
    tm = min(tile_rows, -(-m // 8) * 8)
    padded_rows = -(-m // tm) * tm
    # megablox leaves rows outside every group (and, in the backward pass, their lhs
    # gradient) unwritten: select them away on both sides so they are exact zeros
    inside = (jnp.arange(padded_rows) < jnp.sum(group_sizes))[:, None]
    padded = jnp.where(inside, jnp.pad(lhs, ((0, padded_rows - m), (0, 0))), 0)
    tiling = (tm, 128 if k % 128 == 0 else k, 128 if n % 128 == 0 else n)
    out = megablox.gmm(padded, rhs, group_sizes.astype(jnp.int32), jnp.float32, tiling,
                       None, None, False, jax.default_backend() == "cpu")
    return jnp.where(inside, out, 0.0)[:m].astype(lhs.dtype)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, impl: str | None = None) -> Array:
    """Dispatcher: :func:`gmm_megablox` on TPU, :func:`gmm_ragged` elsewhere, unless
    ``impl`` (one of ``"megablox"``, ``"ragged"``, ``"reference"``) says otherwise."""
    if impl is None:
        impl = "megablox" if jax.default_backend() == "tpu" else "ragged"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; supported: {IMPLS} or None")
    return {"megablox": gmm_megablox, "ragged": gmm_ragged,
            "reference": gmm_reference}[impl](lhs, rhs, group_sizes)
