"""The shared mixture-of-experts layer: routers, SwiGLU experts, shared experts, aux losses.

Every family that needs experts reuses :class:`MoE`; it knows nothing about a family's
config. Expert weights are stacked with the logical axis ``'experts'`` first
(``gate``/``up``: (experts, embed, mlp), ``down``: (experts, mlp, embed)) so expert
parallelism is one rule in the sharding table.

Routing (``x`` one token, ``W_r`` the router, ``E`` experts, top ``k``):

- ``router="softmax"`` (Switch, GShard, Mixtral, Qwen-MoE): ``l = x W_r``,
  ``p = softmax(l)``, ``S = TopK(p, k)``, ``w_i = p_i`` for ``i in S`` (else 0);
  with ``norm_topk_prob`` ``w_i = p_i / sum_{j in S} p_j`` (Mixtral always renormalizes).
- ``router="sigmoid"`` (DeepSeek-V3 style gating): ``p = sigmoid(l)``, the same top-k, and
  ``w_i = p_i`` or, with ``norm_topk_prob``, ``p_i / sum_{j in S} p_j``.

Output: ``y = sum_i w_i E_i(x) + s(x) * S(x)`` where ``E_i(x) = down_i(silu(x gate_i) *
(x up_i))`` and ``S`` is the shared expert (a SwiGLU MLP of width ``d_shared``; DeepSeek's
``n`` shared experts of width ``d`` are one MLP of width ``n * d``). The shared gate ``s`` is
1 (DiT-MoE / DeepSeek: always added) or, with ``shared_expert_gated``,
``sigmoid(x w_s)`` (Qwen2-MoE).

Auxiliary losses are sown, already weighted, into the ``'aux_loss'`` collection
(:data:`AUX_LOSS`, the collection ``train/step.py`` sums):

- balance loss (Switch Transformer eq. 4, GShard): ``alpha * E * sum_i f_i P_i`` with
  ``f_i`` the fraction of tokens that put expert ``i`` in their top-k (so
  ``sum_i f_i = k``, as transformers' ``load_balancing_loss_func``) and ``P_i`` the mean
  router probability of expert ``i``; ``alpha = aux_loss_coef``. It is computed per layer
  over every token of the batch, padding included.
- router z-loss (ST-MoE eq. 5): ``beta * mean_tokens(logsumexp(l)^2)``,
  ``beta = z_loss_coef``.

Execution is dropless (no capacity, no token ever dropped). ``impl="dense"`` evaluates
every expert on every token and combines with the dense (batch, pos, expert) weights: the
reference, exact and simple, ``E`` times the FLOPs. ``impl="ragged"`` sorts the ``k`` copies
of each token by expert and runs the three matmuls with :func:`jax.lax.ragged_dot`
(FLOPs of ``k`` experts per token). Reading ``moe.expert_out`` or editing ``moe.weights``
or ``moe.expert_out`` always uses the dense path (an edit may give weight to an expert the
router did not select), so with ``impl="ragged"`` such runs agree with plain runs to float
rounding, not bit for bit; with ``impl="dense"`` a no-op edit of ``moe.expert_out``,
``moe.weights``, ``moe.router_logits``, ``moe.router_probs`` or ``moe_out`` is bit-identical
(tested). A no-op edit of ``moe.shared_out`` changes XLA's CPU compilation of the layer and
agrees to ~1e-6, not bit for bit (seen on jax 0.10.2 CPU).

Sites (per token; inside a decoder they gain leading ``layer, batch, pos`` axes):
``moe.router_logits`` (expert), ``moe.router_probs`` (expert), ``moe.weights`` (expert: the
combine weight ``w_i``, zero outside the top-k; zeroing entry ``i`` removes expert ``i``
without renormalizing the others), ``moe.expert_out`` (expert, d_model: ``w_i E_i(x)``,
each expert's write, computed only when read or edited and folded back as a difference),
``moe.shared_out`` (d_model: ``s(x) S(x)``, only with a shared expert) and ``moe_out``
(d_model: the layer output) -- the last one is recorded by the caller (the decoder block).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechinterp.sites import INTERVENTIONS, site, site_is_used

from .layers import logical_param

Array = jax.Array
DType = Any

#: The collection auxiliary losses are sown into (``train.step.AUX_LOSS`` has this value).
AUX_LOSS = "aux_loss"
ROUTERS = ("softmax", "sigmoid")
IMPLS = ("dense", "ragged")


def route(logits: Array, k: int, router: str = "softmax",
          norm_topk_prob: bool = False) -> tuple[Array, Array, Array]:
    """``(probs, topk_weights, topk_indices)`` from router logits (..., experts).

    ``probs`` is float32 (softmax or sigmoid of the logits); ``topk_weights`` (..., k) are
    the selected probabilities, renormalized to sum to 1 when ``norm_topk_prob``.
    """
    n_experts = logits.shape[-1]
    if not 1 <= k <= n_experts:
        raise ValueError(f"top-k={k} must be between 1 and the number of experts "
                         f"({n_experts})")
    if router not in ROUTERS:
        raise ValueError(f"router={router!r} is not supported; supported: {ROUTERS}")
    scores = logits.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1) if router == "softmax" else jax.nn.sigmoid(scores)
    weights, indices = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, indices


def dense_weights(weights: Array, indices: Array, n_experts: int) -> Array:
    """Top-k ``(weights, indices)`` (..., k) as dense combine weights (..., experts)."""
    one_hot = jax.nn.one_hot(indices, n_experts, dtype=weights.dtype)
    return jnp.einsum("...k,...ke->...e", weights, one_hot)


def balance_loss(probs: Array, indices: Array, n_experts: int) -> Array:
    """``E * sum_i f_i P_i`` over all tokens (Switch Transformer eq. 4, top-k counts)."""
    probs = probs.reshape(-1, n_experts)
    counts = jax.nn.one_hot(indices.reshape(probs.shape[0], -1), n_experts,
                            dtype=jnp.float32).sum(axis=1)
    f = counts.mean(axis=0)
    p = probs.mean(axis=0)
    return n_experts * jnp.sum(f * p)


def z_loss(logits: Array) -> Array:
    """``mean_tokens(logsumexp(logits)^2)`` (ST-MoE eq. 5)."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(lse * lse)


def experts_dense(x: Array, gate: Array, up: Array, down: Array) -> Array:
    """Every expert on every token: (b, t, e) x (E, e, m) ... -> (b, t, E, e)."""
    pre = jnp.einsum("bte,xem->btxm", x, gate)
    hidden = nn.silu(pre) * jnp.einsum("bte,xem->btxm", x, up)
    return jnp.einsum("btxm,xme->btxe", hidden, down)


def experts_ragged(x: Array, gate: Array, up: Array, down: Array, weights: Array,
                   indices: Array) -> Array:
    """``sum_k weights_k E_{indices_k}(x)`` with tokens sorted by expert and
    :func:`jax.lax.ragged_dot` (dropless; FLOPs of ``k`` experts per token)."""
    b, t, d = x.shape
    k = indices.shape[-1]
    n_experts = gate.shape[0]
    tokens = x.reshape(b * t, d)
    flat = indices.reshape(-1)                                 # (b*t*k,)
    order = jnp.argsort(flat, stable=True)
    rows = tokens[order // k]
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    pre = jax.lax.ragged_dot(rows, gate, sizes)
    hidden = nn.silu(pre) * jax.lax.ragged_dot(rows, up, sizes)
    out = jax.lax.ragged_dot(hidden, down, sizes)              # (b*t*k, d), sorted
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    combined = jnp.zeros((b * t, d), out.dtype).at[order // k].add(out)
    return combined.reshape(b, t, d)


class MoE(nn.Module):
    """Mixture of SwiGLU experts with a top-k router and an optional shared expert.

    See the module docstring for the equations, the losses and the sites. ``x``:
    (batch, pos, d_model) -> (batch, pos, d_model). ``d_shared=0`` means no shared expert.
    """

    n_experts: int
    n_experts_per_tok: int
    d_expert: int
    router: str = "softmax"
    norm_topk_prob: bool = False
    d_shared: int = 0
    shared_expert_gated: bool = False
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    impl: str = "dense"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r} is not supported; supported: {IMPLS}")
        if self.shared_expert_gated and self.d_shared <= 0:
            raise ValueError("shared_expert_gated=True needs a shared expert (d_shared > 0)")
        d_model = x.shape[-1]
        n, m = self.n_experts, self.d_expert
        w_router = logical_param(self, "router", ("embed", "experts"), (d_model, n))
        gate = logical_param(self, "gate", ("experts", "embed", "mlp"), (n, d_model, m))
        up = logical_param(self, "up", ("experts", "embed", "mlp"), (n, d_model, m))
        down = logical_param(self, "down", ("experts", "mlp", "embed"), (n, m, d_model))

        logits = site(self, "moe.router_logits", jnp.einsum("bte,ex->btx", x, w_router))
        probs, top_w, top_i = route(logits, self.n_experts_per_tok, self.router,
                                    self.norm_topk_prob)
        probs = site(self, "moe.router_probs", probs.astype(self.dtype))
        # As transformers: the combine weights are cast to the compute dtype.
        top_w = top_w.astype(self.dtype)
        weights = dense_weights(top_w, top_i, n)
        weights = site(self, "moe.weights", weights)

        if self.aux_loss_coef:
            self.sow(AUX_LOSS, "moe_balance_loss",
                     self.aux_loss_coef * balance_loss(probs, top_i, n))
        if self.z_loss_coef:
            self.sow(AUX_LOSS, "moe_router_z_loss", self.z_loss_coef * z_loss(logits))

        needs_dense = (self.impl == "dense" or site_is_used(self, "moe.expert_out")
                       or self.has_variable(INTERVENTIONS, "moe.weights"))
        if needs_dense:
            per_expert = experts_dense(x, gate, up, down)
            out = jnp.einsum("btx,btxe->bte", weights, per_expert)
            if site_is_used(self, "moe.expert_out"):
                # Folded back as a difference (as attn.head_out): a no-op edit adds exact 0.
                written = weights[..., None] * per_expert
                edited = site(self, "moe.expert_out", written)
                out = out + (edited - written).sum(axis=2)
        else:
            out = experts_ragged(x, gate, up, down, top_w, top_i)

        if self.d_shared > 0:
            s_gate = logical_param(self, "shared_gate", ("embed", "mlp"),
                                   (d_model, self.d_shared))
            s_up = logical_param(self, "shared_up", ("embed", "mlp"), (d_model, self.d_shared))
            s_down = logical_param(self, "shared_down", ("mlp", "embed"),
                                   (self.d_shared, d_model))
            hidden = nn.silu(x @ s_gate) * (x @ s_up)
            shared = hidden @ s_down
            if self.shared_expert_gated:
                w_gate = logical_param(self, "shared_expert_gate", ("embed",), (d_model,))
                shared = nn.sigmoid(jnp.einsum("bte,e->bt", x, w_gate))[..., None] * shared
            out = out + site(self, "moe.shared_out", shared)
        return out
