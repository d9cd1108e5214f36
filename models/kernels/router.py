"""Fused top-k router: logits -> probabilities -> top-k -> the dispatch plan, in one kernel.

For logits ``l`` (tokens, E): ``p = softmax(l)`` or ``sigmoid(l)``, the top-``k`` experts
per token (ties: lower index first) with weights ``p`` or ``p / sum_{S} p``, and the
:class:`RoutingPlan` of the ``T * k`` assignments: ``group_sizes``, ``group_offsets`` and
``order`` (assignments sorted by expert, stably), the rows a grouped matmul reads.

The Pallas kernel works per block of tokens; the cross-block prefix sum and scatter are a
short ``jnp`` epilogue; the backward is a second Pallas kernel (``custom_vjp``).
:func:`fused_router` dispatches: the kernel on GPU (Triton), :func:`fused_router_reference`
elsewhere; ``impl="pallas"`` forces the kernel (interpreted on CPU, as the tests run it).

Design notes (the kernel, gradients, measurements): docs/moe.md ("Fused top-k router").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
ROUTERS = ("softmax", "sigmoid")
IMPLS = ("pallas", "reference")
TAKEN = -1.0  # probabilities are >= 0: a taken entry can never be the max again


class RoutingPlan(NamedTuple):
    """The router's output and the dispatch plan of the ``T * k`` (token, slot) pairs.

    ``probs`` (..., E) float32, ``weights`` (..., k) float32, ``indices`` (..., k) int32;
    over the flattened tokens: ``group_sizes`` (E,) int32, ``group_offsets`` (E,) int32
    (exclusive cumulative sum of the sizes) and ``order`` (T * k,) int32, the assignment ids
    ``t * k + j`` sorted by expert (stable), so ``order // k`` are the token rows.
    """

    probs: Array
    weights: Array
    indices: Array
    group_sizes: Array
    group_offsets: Array
    order: Array


def check_routing(n_experts: int, k: int, router: str) -> None:
    """Raise ``ValueError`` for a top-k outside ``[1, n_experts]`` or an unknown router."""
    if not 1 <= k <= n_experts:
        raise ValueError(f"top-k={k} must be between 1 and the number of experts "
                         f"({n_experts})")
    if router not in ROUTERS:
        raise ValueError(f"router={router!r} is not supported; supported: {ROUTERS}")


def topk_reference(logits: Array, k: int, router: str = "softmax",
                   norm_topk_prob: bool = False) -> tuple[Array, Array, Array]:
    """``(probs, topk_weights, topk_indices)`` in plain jnp; float32 probabilities."""
    scores = logits.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1) if router == "softmax" else jax.nn.sigmoid(scores)
    weights, indices = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, indices


def fused_router_reference(logits: Array, k: int, router: str = "softmax",
                           norm_topk_prob: bool = False) -> RoutingPlan:
    """The :class:`RoutingPlan` with ``jax.lax.top_k``, ``argsort`` and ``bincount``."""
    n_experts = logits.shape[-1]
    check_routing(n_experts, k, router)
    probs, weights, indices = topk_reference(logits, k, router, norm_topk_prob)
    flat = indices.reshape(-1)
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    offsets = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return RoutingPlan(probs, weights, indices, sizes, offsets, order)


# --------------------------------------------------------------------------- Pallas kernels


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _onehot(index_column, n_lanes):
    """(bt, 1) int32 -> (bt, n_lanes) float32 one-hot."""
    lanes = jax.lax.broadcasted_iota(jnp.int32, (index_column.shape[0], n_lanes), 1)
    return (lanes == index_column).astype(jnp.float32)


def _forward_kernel(logits_ref, probs_ref, weights_ref, indices_ref, counts_ref, ranks_ref, *,
                    k, router, norm, n_tokens):
    bt, n_lanes = logits_ref.shape
    k_lanes = weights_ref.shape[1]
    scores = logits_ref[...]
    if router == "softmax":
        e = jnp.exp(scores - jnp.max(scores, axis=1, keepdims=True))
        probs = e / jnp.sum(e, axis=1, keepdims=True)
    else:
        probs = jax.nn.sigmoid(scores)
    probs_ref[...] = probs

    lanes = jax.lax.broadcasted_iota(jnp.int32, (bt, n_lanes), 1)
    slots = jax.lax.broadcasted_iota(jnp.int32, (bt, k_lanes), 1)
    row = jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0) + pl.program_id(0) * bt
    valid = (row < n_tokens).astype(jnp.float32)                 # padded tokens count 0
    remaining = probs
    weights = jnp.zeros((bt, k_lanes), jnp.float32)
    indices = jnp.zeros((bt, k_lanes), jnp.int32)
    chosen = jnp.zeros((bt, n_lanes), jnp.float32)               # 0/1 per token and expert
    for j in range(k):
        best = jnp.max(remaining, axis=1, keepdims=True)
        index = jnp.min(jnp.where(remaining == best, lanes, n_lanes), axis=1, keepdims=True)
        hit = lanes == index
        weights = jnp.where(slots == j, best, weights)
        indices = jnp.where(slots == j, index, indices)
        chosen = chosen + hit.astype(jnp.float32)
        remaining = jnp.where(hit, TAKEN, remaining)
    if norm:
        weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    weights_ref[...] = weights
    indices_ref[...] = indices

    chosen = chosen * valid
    counts_ref[...] = jnp.sum(chosen, axis=0, keepdims=True).astype(jnp.int32)
    # earlier[t, e] = number of tokens t' < t in this block that chose expert e
    tri = (jax.lax.broadcasted_iota(jnp.int32, (bt, bt), 1)
           < jax.lax.broadcasted_iota(jnp.int32, (bt, bt), 0)).astype(jnp.float32)
    earlier = jnp.dot(tri, chosen, preferred_element_type=jnp.float32)
    ranks = jnp.zeros((bt, k_lanes), jnp.float32)
    for j in range(k):
        hit = lanes == jnp.sum(jnp.where(slots == j, indices, 0), axis=1, keepdims=True)
        rank = jnp.sum(jnp.where(hit, earlier, 0.0), axis=1, keepdims=True)
        ranks = jnp.where(slots == j, rank, ranks)
    ranks_ref[...] = ranks.astype(jnp.int32)


def _backward_kernel(probs_ref, indices_ref, dprobs_ref, dweights_ref, dlogits_ref, *,
                     k, router, norm):
    bt, n_lanes = probs_ref.shape
    k_lanes = indices_ref.shape[1]
    probs = probs_ref[...]
    indices = indices_ref[...]
    dweights = dweights_ref[...]
    lanes = jax.lax.broadcasted_iota(jnp.int32, (bt, n_lanes), 1)
    slots = jax.lax.broadcasted_iota(jnp.int32, (bt, k_lanes), 1)

    def column(values, j):
        return jnp.sum(jnp.where(slots == j, values, 0), axis=1, keepdims=True)

    hits = [lanes == column(indices, j) for j in range(k)]
    raw = [jnp.sum(jnp.where(hits[j], probs, 0.0), axis=1, keepdims=True) for j in range(k)]
    dws = [column(dweights, j) for j in range(k)]
    if norm:
        total = sum(raw)
        mean_dw = sum(dw * w for dw, w in zip(dws, raw)) / total    # sum_l dw_l w_l (renormed)
        dws = [(dw - mean_dw) / total for dw in dws]
    dprobs = dprobs_ref[...]
    for hit, dw in zip(hits, dws):
        dprobs = dprobs + jnp.where(hit, dw, 0.0)
    if router == "softmax":
        dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=1, keepdims=True))
    else:
        dlogits = dprobs * probs * (1 - probs)
    dlogits_ref[...] = dlogits


def _layout(n_tokens, n_experts, k, block_tokens):
    bt = min(block_tokens, _next_pow2(max(n_tokens, 8)))
    padded_tokens = -(-n_tokens // bt) * bt
    return bt, padded_tokens, _next_pow2(n_experts), _next_pow2(k)


def _call_forward(logits, k, router, norm, block_tokens):
    n_tokens, n_experts = logits.shape
    bt, padded_tokens, n_lanes, k_lanes = _layout(n_tokens, n_experts, k, block_tokens)
    # absent experts get probability 0 (-inf logits); padded tokens are zeros, never counted
    padded = jnp.pad(logits, ((0, 0), (0, n_lanes - n_experts)),
                     constant_values=-jnp.inf)
    padded = jnp.pad(padded, ((0, padded_tokens - n_tokens), (0, 0)))
    n_blocks = padded_tokens // bt
    rows = lambda width: pl.BlockSpec((bt, width), lambda i: (i, 0))
    kernel = functools.partial(_forward_kernel, k=k, router=router, norm=norm,
                               n_tokens=n_tokens)
    probs, weights, indices, counts, ranks = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((padded_tokens, n_lanes), jnp.float32),
                   jax.ShapeDtypeStruct((padded_tokens, k_lanes), jnp.float32),
                   jax.ShapeDtypeStruct((padded_tokens, k_lanes), jnp.int32),
                   jax.ShapeDtypeStruct((n_blocks, n_lanes), jnp.int32),
                   jax.ShapeDtypeStruct((padded_tokens, k_lanes), jnp.int32)],
        grid=(n_blocks,),
        in_specs=[rows(n_lanes)],
        out_specs=[rows(n_lanes), rows(k_lanes), rows(k_lanes),
                   pl.BlockSpec((1, n_lanes), lambda i: (i, 0)), rows(k_lanes)],
        interpret=jax.default_backend() == "cpu",
    )(padded)
    return (probs[:n_tokens, :n_experts], weights[:n_tokens, :k], indices[:n_tokens, :k],
            counts[:, :n_experts], ranks[:n_tokens, :k], bt)


def _call_backward(probs, indices, dprobs, dweights, k, router, norm, block_tokens):
    n_tokens, n_experts = probs.shape
    bt, padded_tokens, n_lanes, k_lanes = _layout(n_tokens, n_experts, k, block_tokens)

    def pad(a, width):
        return jnp.pad(a, ((0, padded_tokens - n_tokens), (0, width - a.shape[1])))

    rows = lambda width: pl.BlockSpec((bt, width), lambda i: (i, 0))
    dlogits = pl.pallas_call(
        functools.partial(_backward_kernel, k=k, router=router, norm=norm),
        out_shape=jax.ShapeDtypeStruct((padded_tokens, n_lanes), jnp.float32),
        grid=(padded_tokens // bt,),
        in_specs=[rows(n_lanes), rows(k_lanes), rows(n_lanes), rows(k_lanes)],
        out_specs=rows(n_lanes),
        interpret=jax.default_backend() == "cpu",
    )(pad(probs, n_lanes), pad(indices, k_lanes), pad(dprobs.astype(jnp.float32), n_lanes),
      pad(dweights.astype(jnp.float32), k_lanes))
    return dlogits[:n_tokens, :n_experts]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _route_kernel(logits, k, router, norm, block_tokens):
    return _call_forward(logits, k, router, norm, block_tokens)[:5]


def _route_fwd(logits, k, router, norm, block_tokens):
    out = _route_kernel(logits, k, router, norm, block_tokens)
    return out, (out[0], out[2])


def _route_bwd(k, router, norm, block_tokens, residuals, cotangents):
    probs, indices = residuals
    dprobs, dweights = cotangents[:2]
    return (_call_backward(probs, indices, dprobs, dweights, k, router, norm, block_tokens),)


_route_kernel.defvjp(_route_fwd, _route_bwd)


def fused_router_pallas(logits: Array, k: int, router: str = "softmax",
                        norm_topk_prob: bool = False, block_tokens: int = 128) -> RoutingPlan:
    """The :class:`RoutingPlan` from one Pallas kernel plus a ``jnp`` epilogue (see the
    module docstring). ``logits`` (..., E); the GPU path was never run on a GPU here."""
    n_experts = logits.shape[-1]
    check_routing(n_experts, k, router)
    if block_tokens < 8 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two >= 8, got {block_tokens}")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, n_experts).astype(jnp.float32)  # the kernel's math is float32
    probs, weights, indices, block_counts, ranks = _route_kernel(
        flat, k, router, bool(norm_topk_prob), block_tokens)
    bt = _layout(flat.shape[0], n_experts, k, block_tokens)[0]
    sizes = block_counts.sum(axis=0)
    offsets = jnp.cumsum(sizes) - sizes
    block_prefix = jnp.cumsum(block_counts, axis=0) - block_counts      # (blocks, E)
    block_of_token = jnp.arange(flat.shape[0]) // bt
    positions = offsets[indices] + block_prefix[block_of_token[:, None], indices] + ranks
    order = jnp.zeros(indices.size, jnp.int32).at[positions.reshape(-1)].set(
        jnp.arange(indices.size, dtype=jnp.int32), unique_indices=True)
    return RoutingPlan(probs.reshape(*lead, n_experts), weights.reshape(*lead, k),
                       indices.reshape(*lead, k), sizes.astype(jnp.int32),
                       offsets.astype(jnp.int32), order)


def fused_router(logits: Array, k: int, router: str = "softmax", norm_topk_prob: bool = False,
                 impl: str | None = None) -> RoutingPlan:
    """Dispatcher: :func:`fused_router_pallas` on GPU (or ``impl="pallas"``, interpreted on
    CPU), :func:`fused_router_reference` elsewhere (or ``impl="reference"``)."""
    if impl is None:
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; supported: {IMPLS} or None")
    if impl == "pallas":
        return fused_router_pallas(logits, k, router, norm_topk_prob)
    return fused_router_reference(logits, k, router, norm_topk_prob)
