"""Grouped matrix multiplication over experts: the matmul of dropless MoE execution.

``lhs`` (M, K) holds token rows sorted by expert, ``rhs`` (E, K, N) one matrix per expert,
``group_sizes`` (E,) how many consecutive rows each expert owns::

    out[r] = lhs[r] @ rhs[g(r)]   (g(r) the group that owns row r; later rows are 0)

Implementations: :func:`gmm_reference` (loop over experts), :func:`gmm_ragged`
(``jax.lax.ragged_dot``), :func:`gmm_megablox` (TPU Pallas) and :func:`gmm_pallas`
(block-padded Pallas, GPU-style). :func:`gmm` dispatches: megablox on TPU,
:func:`gmm_pallas` on GPU where K and N fit Triton blocks (6.8x ``ragged_dot`` in
bfloat16 on an H200), ``ragged_dot`` otherwise.

Design notes (the H200 timings, what was tested where): docs/moe.md ("Grouped matmul").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

Array = jax.Array
IMPLS = ("megablox", "pallas", "ragged", "reference")
BLOCK_K, BLOCK_N = 64, 128  # gmm_pallas's K and N blocks
# float32 operands multiply in float32 (Triton's default for float32 is TF32, ~1e-3 relative
# error); bfloat16 operands are unaffected.
_EXACT = jax.lax.Precision.HIGHEST


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
    """Dispatcher: :func:`gmm_megablox` on TPU, :func:`gmm_pallas` on GPU where its blocks
    fit (:func:`fits_triton`), :func:`gmm_ragged` otherwise, unless ``impl`` (one of
    ``"megablox"``, ``"pallas"``, ``"ragged"``, ``"reference"``) says otherwise."""
    if impl is None:
        backend = jax.default_backend()
        if backend == "tpu":
            impl = "megablox"
        elif backend == "gpu" and fits_triton(lhs.shape[-1], rhs.shape[-1]):
            impl = "pallas"
        else:
            impl = "ragged"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; supported: {IMPLS} or None")
    return {"megablox": gmm_megablox, "pallas": gmm_pallas, "ragged": gmm_ragged,
            "reference": gmm_reference}[impl](lhs, rhs, group_sizes)


# --------------------------------------------------------------------------- block-padded Pallas


class _Layout(NamedTuple):
    """Rows of each group moved to a tile-aligned slot: group ``g`` starts at row
    ``padded_offsets[g]`` (a multiple of the tile) of a (padded_rows, .) buffer."""

    dest: Array            # (M,) destination row of each input row (padded_rows if outside)
    tile_group: Array      # (tiles,) the group of each tile, E for unused tiles
    tile_start: Array      # (E,) first tile of each group
    tile_count: Array      # (E,) tiles of each group


def _layout(group_sizes: Array, n_rows: int, tile: int, padded_rows: int) -> _Layout:
    sizes = group_sizes.astype(jnp.int32)
    tiles = (sizes + tile - 1) // tile
    tile_start = jnp.cumsum(tiles) - tiles
    groups = row_groups(sizes, n_rows)
    inside = groups < sizes.shape[0]
    g = jnp.minimum(groups, sizes.shape[0] - 1)
    rank = jnp.arange(n_rows) - (jnp.cumsum(sizes) - sizes)[g]
    dest = jnp.where(inside, tile_start[g] * tile + rank, padded_rows)
    tile_group = jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(padded_rows // tile),
                                  side="right").astype(jnp.int32)
    return _Layout(dest, tile_group, tile_start.astype(jnp.int32), tiles.astype(jnp.int32))


def _gmm_kernel(tile_group_ref, lhs_ref, rhs_ref, out_ref, *, n_groups, block_k, block_cols):
    group = tile_group_ref[pl.program_id(0)]
    weights = jnp.minimum(group, n_groups - 1)
    cols = pl.ds(pl.program_id(1) * block_cols, block_cols)

    def add_block(i, acc):  # K in blocks: a (tile, K) or (K, block) operand overflows SMEM
        ks = pl.ds(i * block_k, block_k)
        return acc + jnp.dot(lhs_ref[:, ks], rhs_ref[weights, ks, cols],
                             preferred_element_type=jnp.float32, precision=_EXACT)

    acc = jax.lax.fori_loop(0, lhs_ref.shape[1] // block_k, add_block,
                            jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = jnp.where(group < n_groups, acc, 0.0).astype(out_ref.dtype)


def _tgmm_kernel(tile_start_ref, tile_count_ref, lhs_ref, dout_ref, out_ref, *, tile, block_k,
                 block_cols):
    group = pl.program_id(0)
    ks = pl.ds(pl.program_id(1) * block_k, block_k)
    cols = pl.ds(pl.program_id(2) * block_cols, block_cols)
    start = tile_start_ref[group]

    def add_tile(t, acc):
        rows = pl.ds((start + t) * tile, tile)
        return acc + jnp.dot(lhs_ref[rows, ks].T, dout_ref[rows, cols],
                             preferred_element_type=jnp.float32, precision=_EXACT)

    acc = jnp.zeros(out_ref.shape[1:], jnp.float32)
    out_ref[0] = jax.lax.fori_loop(0, tile_count_ref[group], add_tile, acc).astype(
        out_ref.dtype)


def _block(size: int, preferred: int) -> int:
    """``preferred`` where it divides ``size``, else the whole dimension as one block."""
    return preferred if size % preferred == 0 else size


def _triton_block(size: int) -> bool:
    return size >= 16 and not size & (size - 1)


def fits_triton(k: int, n: int) -> bool:
    """Whether :func:`gmm_pallas` compiles on a GPU for ``K = k``, ``N = n``: each of its K
    blocks (64, or all of K) and N blocks (128, or all of N) is a power of two >= 16."""
    return _triton_block(_block(k, BLOCK_K)) and _triton_block(_block(n, BLOCK_N))


def _sizes(m: int, k: int, n: int, n_groups: int, tile_rows: int):
    """Row tile, padded rows and the K and N blocks (K in blocks of 64 and N of 128, so that
    a program's operands fit a GPU's shared memory)."""
    tile = min(tile_rows, max(16, 1 << (m - 1).bit_length()))
    padded_rows = -(-(m + n_groups * (tile - 1)) // tile) * tile
    if jax.default_backend() == "gpu" and not fits_triton(k, n):
        raise ValueError(
            f"gmm_pallas on a GPU needs K and N that are multiples of {BLOCK_K} and "
            f"{BLOCK_N} or powers of two >= 16 (Triton blocks); got K={k}, N={n}. Use "
            "gmm(..., impl='ragged') for this shape")
    return tile, padded_rows, _block(k, BLOCK_K), _block(n, BLOCK_N)


def _padded_gmm(lhs_padded, rhs, tile_group, tile, block_k, block_cols):
    rows, k = lhs_padded.shape
    n_groups, _, n = rhs.shape
    full = lambda *shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(_gmm_kernel, n_groups=n_groups, block_k=block_k,
                          block_cols=block_cols),
        out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32),
        grid=(rows // tile, n // block_cols),
        in_specs=[full(*tile_group.shape), pl.BlockSpec((tile, k), lambda i, j: (i, 0)),
                  full(*rhs.shape)],
        out_specs=pl.BlockSpec((tile, block_cols), lambda i, j: (i, j)),
        interpret=jax.default_backend() == "cpu",
    )(tile_group, lhs_padded, rhs)


def _scatter_rows(x, layout, padded_rows):
    return jnp.zeros((padded_rows, x.shape[1]), x.dtype).at[layout.dest].set(x, mode="drop")


def _gather_rows(padded, layout):
    return jnp.take(padded, layout.dest, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_pallas(lhs, rhs, group_sizes, tile_rows):
    (m, k), (n_groups, _, n) = lhs.shape, rhs.shape
    tile, padded_rows, block_k, block_cols = _sizes(m, k, n, n_groups, tile_rows)
    layout = _layout(group_sizes, m, tile, padded_rows)
    out = _padded_gmm(_scatter_rows(lhs, layout, padded_rows), rhs, layout.tile_group, tile,
                      block_k, block_cols)
    return _gather_rows(out, layout).astype(lhs.dtype)


def _gmm_fwd(lhs, rhs, group_sizes, tile_rows):
    return _gmm_pallas(lhs, rhs, group_sizes, tile_rows), (lhs, rhs, group_sizes)


def _gmm_bwd(tile_rows, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dlhs = _gmm_pallas(dout.astype(lhs.dtype), jnp.swapaxes(rhs, 1, 2), group_sizes,
                       tile_rows)
    m, k = lhs.shape
    n_groups, _, n = rhs.shape
    tile, padded_rows, block_k, block_cols = _sizes(m, k, n, n_groups, tile_rows)
    layout = _layout(group_sizes, m, tile, padded_rows)
    full = lambda *shape: pl.BlockSpec(shape, lambda e, i, j: (0,) * len(shape))
    drhs = pl.pallas_call(
        functools.partial(_tgmm_kernel, tile=tile, block_k=block_k, block_cols=block_cols),
        out_shape=jax.ShapeDtypeStruct(rhs.shape, jnp.float32),
        grid=(n_groups, k // block_k, n // block_cols),
        in_specs=[full(n_groups), full(n_groups), full(padded_rows, k),
                  full(padded_rows, n)],
        out_specs=pl.BlockSpec((1, block_k, block_cols), lambda e, i, j: (e, i, j)),
        interpret=jax.default_backend() == "cpu",
    )(layout.tile_start, layout.tile_count, _scatter_rows(lhs, layout, padded_rows),
      _scatter_rows(dout, layout, padded_rows))
    return dlhs, drhs.astype(rhs.dtype), None


_gmm_pallas.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_pallas(lhs: Array, rhs: Array, group_sizes: Array, tile_rows: int = 64) -> Array:
    """Block-padded grouped matmul in Pallas (GPU-style; ``interpret=True`` on CPU). Each
    group's rows are copied to a slot aligned to ``tile_rows``, so
    every row tile belongs to one group; grid (row tiles, column tiles), each program one
    ``(tile, K) @ (K, block)`` product with its group's matrix. ``d lhs`` reuses the kernel
    with ``rhs`` transposed; ``d rhs`` is a second kernel, one program per (group, column
    block) summing ``lhs_tile^T @ dout_tile`` over the group's tiles. Padding costs at most
    ``E * (tile_rows - 1)`` extra rows."""
    check_gmm_args(lhs, rhs, group_sizes)
    if tile_rows < 8 or tile_rows & (tile_rows - 1):
        raise ValueError(f"tile_rows must be a power of two >= 8, got {tile_rows}")
    return _gmm_pallas(lhs, rhs, group_sizes, tile_rows)
