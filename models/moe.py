"""The shared mixture-of-experts layer: routers, SwiGLU experts, shared experts, aux losses.

:class:`MoE` is reused by every family with experts; expert weights are stacked with the
logical axis ``'experts'`` first. Output ``y = sum_i w_i E_i(x) + s(x) S(x)`` with
``E_i(x) = down_i(silu(x gate_i) * (x up_i))`` and ``S`` an optional shared expert.

Routers (``ROUTERS``): ``softmax`` (Switch, GShard, Mixtral, Qwen-MoE), ``sigmoid``
(DeepSeek-V3), ``centroid`` (Moirai-MoE), ``expert_choice`` (Zhou et al. 2022); GShard
capacity dropping; Switch jitter. Aux losses in ``AUX_LOSS``: balance (Switch eq. 4,
``alpha * E * sum_i f_i P_i``, or DiT-MoE's form) and z-loss (ST-MoE eq. 5). ``impl``
``"dense"`` or ``"ragged"`` (grouped matmuls); ``router_impl`` ``"jnp"``, ``"fused"``,
``"pallas"``. Key names: :func:`route`, :func:`balance_loss`, :func:`z_loss`; sites ``moe.*``.

Design notes (formulas, capacity, exactness of edits, the site list): docs/moe.md.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechinterp.sites import INTERVENTIONS, site, site_is_used

from .kernels.gmm import gmm
from .kernels.router import check_routing, fused_router, topk_reference
from .layers import logical_param

Array = jax.Array
DType = Any

#: The collection auxiliary losses are sown into (``train.step.AUX_LOSS`` has this value).
AUX_LOSS = "aux_loss"
ROUTERS = ("softmax", "sigmoid", "centroid", "expert_choice")
IMPLS = ("dense", "ragged")
ROUTER_IMPLS = ("jnp", "fused", "pallas")
BALANCE_FORMS = ("switch", "dit")


def route(logits: Array, k: int, router: str = "softmax",
          norm_topk_prob: bool = False) -> tuple[Array, Array, Array]:
    """``(probs, topk_weights, topk_indices)`` from router logits (..., experts) for the
    token-choice routers ``"softmax"`` and ``"sigmoid"``.

    ``probs`` is float32 (softmax or sigmoid of the logits); ``topk_weights`` (..., k) are
    the selected probabilities, renormalized to sum to 1 when ``norm_topk_prob``.
    """
    check_routing(logits.shape[-1], k, router)
    return topk_reference(logits, k, router, norm_topk_prob)


def dense_weights(weights: Array, indices: Array, n_experts: int) -> Array:
    """Top-k ``(weights, indices)`` (..., k) as dense combine weights (..., experts)."""
    one_hot = jax.nn.one_hot(indices, n_experts, dtype=weights.dtype)
    return jnp.einsum("...k,...ke->...e", weights, one_hot)


def balance_loss(probs: Array, indices: Array, n_experts: int, form: str = "switch") -> Array:
    """``E * sum_i f_i P_i`` over all tokens (Switch Transformer eq. 4, top-k counts), or
    with ``form="dit"`` DiT-MoE's ``sum_i f'_i P_i``, ``f'_i = E / (k N) count_i``."""
    if form not in BALANCE_FORMS:
        raise ValueError(f"balance_loss_form={form!r} is not supported; supported: "
                         f"{BALANCE_FORMS}")
    probs = probs.reshape(-1, n_experts)
    indices = indices.reshape(probs.shape[0], -1)
    counts = jax.nn.one_hot(indices, n_experts, dtype=jnp.float32).sum(axis=1)
    f = counts.mean(axis=0)
    p = probs.mean(axis=0)
    scale = n_experts if form == "switch" else n_experts / indices.shape[1]
    return scale * jnp.sum(f * p)


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor * n_tokens * k / n_experts)``, at most ``n_tokens``."""
    return min(n_tokens, math.ceil(capacity_factor * n_tokens * k / n_experts))


def capacity_keep(indices: Array, n_experts: int, capacity: int) -> Array:
    """Which top-k assignments (..., k) fit their expert's capacity: each expert keeps its
    first ``capacity`` assignments, all first choices in token order before all second
    choices (GShard priority)."""
    k = indices.shape[-1]
    flat = indices.reshape(-1, k)
    slot_major = jax.nn.one_hot(flat.T, n_experts, dtype=jnp.int32).reshape(-1, n_experts)
    rank = jnp.cumsum(slot_major, axis=0) - slot_major                 # earlier assignments
    rank = jnp.sum(rank * slot_major, axis=-1).reshape(k, -1).T        # (tokens, k)
    return (rank < capacity).reshape(indices.shape)


def centroid_logits(x: Array, centroids: Array) -> Array:
    """``-||x - c_i||^2`` (..., d) x (E, d) -> (..., E) in float32 (Moirai-MoE)."""
    diff = x.astype(jnp.float32)[..., None, :] - centroids.astype(jnp.float32)
    return -jnp.sum(diff * diff, axis=-1)


def expert_choice_weights(probs: Array, capacity: int) -> Array:
    """Dense combine weights (..., E): each expert keeps the probabilities of its
    ``capacity`` highest-scoring tokens over all leading axes (ties: the earlier token)."""
    flat = probs.reshape(-1, probs.shape[-1])
    values, tokens = jax.lax.top_k(flat.T, capacity)                   # (E, C)
    experts = jnp.broadcast_to(jnp.arange(flat.shape[1])[:, None], tokens.shape)
    dense = jnp.zeros_like(flat).at[tokens, experts].set(values)
    return dense.reshape(probs.shape)


def z_loss(logits: Array) -> Array:
    """``mean_tokens(logsumexp(logits)^2)`` (ST-MoE eq. 5)."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(lse * lse)


def experts_dense(x: Array, gate: Array, up: Array, down: Array) -> Array:
    """Every expert on every token: (b, t, e) x (E, e, m) ... -> (b, t, E, e)."""
    pre = jnp.einsum("bte,xem->btxm", x, gate)
    hidden = nn.silu(pre) * jnp.einsum("bte,xem->btxm", x, up)
    return jnp.einsum("btxm,xme->btxe", hidden, down)


def experts_per_input(x: Array, gate: Array, up: Array, down: Array) -> Array:
    """Expert ``i`` on its own input ``x[:, :, i]``: (b, t, E, e) -> (b, t, E, e)."""
    pre = jnp.einsum("btxe,xem->btxm", x, gate)
    hidden = nn.silu(pre) * jnp.einsum("btxe,xem->btxm", x, up)
    return jnp.einsum("btxm,xme->btxe", hidden, down)


def experts_ragged(x: Array, gate: Array, up: Array, down: Array, weights: Array,
                   indices: Array, order: Array | None = None,
                   sizes: Array | None = None) -> Array:
    """``sum_k weights_k E_{indices_k}(x)`` with tokens sorted by expert and grouped matmuls
    (:func:`~mechinterp.models.kernels.gmm`: ``ragged_dot``, or the Pallas kernel on GPU;
    dropless; FLOPs of ``k`` experts per token). ``order`` and
    ``sizes`` (the router's dispatch plan) are computed here when not given."""
    b, t, d = x.shape
    k = indices.shape[-1]
    n_experts = gate.shape[0]
    tokens = x.reshape(b * t, d)
    flat = indices.reshape(-1)                                 # (b*t*k,)
    if order is None:
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    rows = tokens[order // k]
    pre = gmm(rows, gate, sizes)
    hidden = nn.silu(pre) * gmm(rows, up, sizes)
    out = gmm(hidden, down, sizes)                             # (b*t*k, d), sorted
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    combined = jnp.zeros((b * t, d), out.dtype).at[order // k].add(out)
    return combined.reshape(b, t, d)


class MoE(nn.Module):
    """Mixture of SwiGLU experts with a router and an optional shared expert.

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
    router_impl: str = "jnp"
    centroids: Any = None            # (n_experts, d_model) array for router="centroid"
    capacity_factor: float | None = None
    jitter_noise: float = 0.0
    balance_loss_form: str = "switch"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def _check(self, d_model: int) -> None:
        for name, value, allowed in (("impl", self.impl, IMPLS),
                                     ("router", self.router, ROUTERS),
                                     ("router_impl", self.router_impl, ROUTER_IMPLS),
                                     ("balance_loss_form", self.balance_loss_form,
                                      BALANCE_FORMS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; supported: {allowed}")
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"top-k={self.n_experts_per_tok} must be between 1 and the "
                             f"number of experts ({self.n_experts})")
        if self.shared_expert_gated and self.d_shared <= 0:
            raise ValueError("shared_expert_gated=True needs a shared expert (d_shared > 0)")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got "
                             f"{self.capacity_factor!r}")
        if self.jitter_noise < 0:
            raise ValueError(f"jitter_noise must be >= 0, got {self.jitter_noise!r}")
        if (self.router == "centroid") != (self.centroids is not None):
            raise ValueError("router='centroid' needs centroids (n_experts, d_model), and "
                             "centroids are used only by router='centroid'")
        if self.router == "centroid" and jnp.shape(self.centroids) != (self.n_experts, d_model):
            raise ValueError(f"centroids must have shape (n_experts, d_model) = "
                             f"({self.n_experts}, {d_model}), got {jnp.shape(self.centroids)}")
        if self.router == "expert_choice" and self.aux_loss_coef:
            raise ValueError("expert-choice routing is balanced by construction: set "
                             "aux_loss_coef=0")
        if self.router == "expert_choice" and self.router_impl != "jnp":
            raise ValueError("expert-choice routing has no top-k kernel: use router_impl='jnp'")

    def _router_logits(self, x: Array) -> Array:
        if self.router == "centroid":
            return centroid_logits(x, jnp.asarray(self.centroids))
        w_router = logical_param(self, "router", ("embed", "experts"),
                                 (x.shape[-1], self.n_experts))
        if self.jitter_noise > 0 and self.has_rng("dropout"):
            eps = self.jitter_noise
            x = x * jax.random.uniform(self.make_rng("dropout"), x.shape, x.dtype,
                                       1 - eps, 1 + eps)
        return jnp.einsum("bte,ex->btx", x, w_router)

    def _token_choice(self, logits: Array):
        """``(probs, top_w, top_i, plan)``; ``plan`` is ``(order, sizes)`` or ``None``."""
        kind = "softmax" if self.router == "centroid" else self.router
        k = self.n_experts_per_tok
        if self.router_impl == "jnp":
            return (*route(logits, k, kind, self.norm_topk_prob), None)
        plan = fused_router(logits, k, kind, self.norm_topk_prob,
                            impl="pallas" if self.router_impl == "pallas" else None)
        return plan.probs, plan.weights, plan.indices, (plan.order, plan.group_sizes)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_model = x.shape[-1]
        self._check(d_model)
        n, m, k = self.n_experts, self.d_expert, self.n_experts_per_tok
        n_tokens = x.shape[0] * x.shape[1]
        logits = site(self, "moe.router_logits", self._router_logits(x))
        gate = logical_param(self, "gate", ("experts", "embed", "mlp"), (n, d_model, m))
        up = logical_param(self, "up", ("experts", "embed", "mlp"), (n, d_model, m))
        down = logical_param(self, "down", ("experts", "mlp", "embed"), (n, m, d_model))

        top_i = plan = None
        if self.router == "expert_choice":
            probs = site(self, "moe.router_probs",
                         jax.nn.softmax(logits.astype(jnp.float32), -1).astype(self.dtype))
            capacity = expert_capacity(n_tokens, n, k, self.capacity_factor or 1.0)
            weights = expert_choice_weights(probs, capacity)
        else:
            probs, top_w, top_i, plan = self._token_choice(logits)
            probs = site(self, "moe.router_probs", probs.astype(self.dtype))
            site(self, "moe.topk_indices", top_i)  # integer: read-only (edits are floats)
            # As transformers: the combine weights are cast to the compute dtype.
            top_w = top_w.astype(self.dtype)
            if self.capacity_factor is not None:
                capacity = expert_capacity(n_tokens, n, k, self.capacity_factor)
                top_w = jnp.where(capacity_keep(top_i, n, capacity), top_w, 0)
            top_w = site(self, "moe.topk_weights", top_w)
            weights = dense_weights(top_w, top_i, n)
        weights = site(self, "moe.weights", weights)

        if self.aux_loss_coef:
            self.sow(AUX_LOSS, "moe_balance_loss", self.aux_loss_coef
                     * balance_loss(probs, top_i, n, self.balance_loss_form))
        if self.z_loss_coef:
            self.sow(AUX_LOSS, "moe_router_z_loss", self.z_loss_coef * z_loss(logits))

        reads_input = site_is_used(self, "moe.expert_in")
        needs_dense = (self.impl == "dense" or top_i is None or reads_input
                       or site_is_used(self, "moe.expert_out")
                       or self.has_variable(INTERVENTIONS, "moe.weights"))
        if needs_dense:
            per_expert = experts_dense(x, gate, up, down)
            if reads_input:
                every = jnp.broadcast_to(x[:, :, None], (*x.shape[:2], n, d_model))
                edited_in = site(self, "moe.expert_in", every)
                per_expert = per_expert + (experts_per_input(edited_in, gate, up, down)
                                           - experts_per_input(every, gate, up, down))
            out = jnp.einsum("btx,btxe->bte", weights, per_expert)
            if site_is_used(self, "moe.expert_out"):
                # Folded back as a difference (as attn.head_out): a no-op edit adds exact 0.
                written = weights[..., None] * per_expert
                edited = site(self, "moe.expert_out", written)
                out = out + (edited - written).sum(axis=2)
        else:
            out = experts_ragged(x, gate, up, down, top_w, top_i, *(plan or ()))

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
