"""Decoder-only time-series forecasters: Moirai-MoE-style (patches) and MIRA-style (points).

:class:`MoiraiForecaster` (Liu et al., 2024): one input projection of ``patch`` values,
causal pre-norm blocks, one output projection predicting the next patch at every position;
the feed-forward is dense (``n_experts=0``) or the shared :class:`~mechinterp.models.moe.MoE`
with ``router="centroid"``: logits ``-||x - c_i||^2`` to fixed per-layer k-means centroids
of a pretrained dense model's ``ffn_in`` tokens, so the nearest centroids win; softmax over
the selected top-k. :class:`MiraForecaster` (MIRA, 2025): one token per observation, CT-RoPE
angles ``theta_i(t) = omega_i * t`` from real timestamps (so scores depend on ``t_n - t_m``),
MoE with a sigmoid-gated shared expert, and a neural ODE ``dh/ds = f(h, s)`` (diffrax; ``f``
a linen apply) carrying the last hidden state to ``s = t* - t_N`` for any target time
``t*``. Sites: ``SITES``; docs/sites.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import diffrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import SiteSpec, site

from .decoder import _MOE_SITES, Decoder
from .layers import Attention, GatedMLP, RMSNorm, rope_angles, rope_inv_freq
from .moe import MoE

Array = jax.Array
ROPES = ("continuous", "index")
HEADS = ("ode", "direct")


@dataclasses.dataclass(frozen=True)
class ForecasterConfig:
    """Backbone sizes. ``n_experts=0``: dense SwiGLU of width ``d_ff``; otherwise ``top_k``
    of ``n_experts`` SwiGLU experts of width ``d_expert`` (equal active parameters when
    ``top_k * d_expert == d_ff``), a shared expert of width ``d_shared`` (0: none);
    ``norm_topk``: the selected probabilities renormalised (softmax over the selected)."""

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 64
    n_experts: int = 0
    top_k: int = 2
    d_expert: int = 32
    d_shared: int = 0
    shared_gated: bool = False
    router: str = "softmax"
    norm_topk: bool = False
    aux_loss_coef: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.n_heads} heads "
                             "of even size (RoPE rotates pairs)")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


def _spec(axes: str, doc: str) -> SiteSpec:
    return SiteSpec(tuple(axes.split()), doc)


_BLOCK_SITES = {name: Decoder.SITES[name] for name in (
    "resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.head_out",
    "attn_out", "resid_mid", "mlp.pre", "mlp.hidden", "mlp_out", "resid_post")}
_BLOCK_SITES["ffn_in"] = _spec("layer batch pos d_model",
                               "normed input of the feed-forward (what the centroids cluster)")
_BLOCK_SITES.update(_MOE_SITES)


def causal_mask(observed: Array) -> Array:
    """(batch, query, key) boolean: key at or before the query and observed (each token
    always sees itself, so no row is empty)."""
    n = observed.shape[-1]
    causal = jnp.tril(jnp.ones((n, n), bool))
    return (causal[None] & observed[:, None, :].astype(bool)) | jnp.eye(n, dtype=bool)[None]


class ForecastBlock(nn.Module):
    """Pre-norm block ``x + attn(norm x)``, ``x + ffn(norm x)``; ``centroids`` (E, d) for
    the centroid router."""

    c: ForecasterConfig
    centroids: Any = None

    @nn.compact
    def __call__(self, x, rope, mask):
        c = self.c
        x = site(self, "resid_pre", x)
        h = RMSNorm(c.norm_eps, name="attn_norm")(x)
        a, _ = Attention(c.n_heads, c.n_heads, c.d_model // c.n_heads, name="attn")(
            h, rope, mask)
        x = site(self, "resid_mid", x + site(self, "attn_out", a))
        h = site(self, "ffn_in", RMSNorm(c.norm_eps, name="ffn_norm")(x))
        if c.n_experts:
            m = site(self, "moe_out", MoE(
                c.n_experts, c.top_k, c.d_expert, router=c.router, norm_topk_prob=c.norm_topk,
                d_shared=c.d_shared,
                shared_expert_gated=c.shared_gated, aux_loss_coef=c.aux_loss_coef,
                centroids=self.centroids, name="moe")(h))
        else:
            m = site(self, "mlp_out", GatedMLP(c.d_ff, name="mlp")(h))
        return site(self, "resid_post", x + m)


class _Backbone(nn.Module):
    """Shared body of both forecasters (not a family on its own)."""

    c: ForecasterConfig
    centroids: Any = None

    @nn.compact
    def __call__(self, x, positions, observed):
        c = self.c
        inv_freq = rope_inv_freq(c.d_model // c.n_heads, c.rope_theta)
        rope = rope_angles(positions, inv_freq, x.dtype)
        mask = causal_mask(observed)
        for i in range(c.n_layers):
            cent = None if self.centroids is None else np.asarray(self.centroids[i])
            x = ForecastBlock(c, cent, name=f"layers_{i}")(x, rope, mask)
        return site(self, "final_norm", RMSNorm(c.norm_eps, name="norm")(x))


def _ffn_kind(c: ForecasterConfig) -> tuple[str, SublayerSites]:
    out = "moe_out" if c.n_experts else "mlp_out"
    return ("moe" if c.n_experts else "mlp"), SublayerSites("resid_mid", out, "resid_post")


class _Family:
    """The capabilities both forecasters share (HasLayers, SelectsOutputs)."""

    selectable_outputs: ClassVar[frozenset[str]] = frozenset({"positions"})

    def layer_structure(self) -> LayerStructure:
        kind, ffn = _ffn_kind(self.c)
        return LayerStructure(
            n_layers=self.c.n_layers, residual=("resid_pre", "resid_mid", "resid_post"),
            sublayers={"attn": SublayerSites("resid_pre", "attn_out", "resid_mid"), kind: ffn})

    def output_selection(self, positions, columns=None):
        if columns is not None:
            raise ValueError(f"{type(self).__name__} selects positions only (columns=None)")
        return {"output_positions": positions}


def _select(y, positions):
    if positions is None:
        return y
    idx = positions.reshape(*positions.shape, *([1] * (y.ndim - 2)))
    return jnp.take_along_axis(y, idx, axis=1)


class MoiraiForecaster(_Family, nn.Module):
    """``series`` (batch, n_patches * patch), instance-normalised -> next-patch forecasts
    (batch, n_patches, patch): output ``p`` predicts patch ``p + 1``. ``centroids``: nested
    tuples (n_layers, n_experts, d_model) with ``c.router == "centroid"`` (hashable, so
    the analysis core can jit the model)."""

    c: ForecasterConfig
    patch: int = 4
    centroids: Any = None

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": _spec("batch pos d_model", "input patch projection"),
        **_BLOCK_SITES,
        "final_norm": _spec("batch pos d_model", "residual after the final norm"),
        "forecast": _spec("batch pos patch", "next-patch forecast per position"),
    }

    @nn.compact
    def __call__(self, series, output_positions=None):
        if series.ndim != 2 or series.shape[1] % self.patch:
            raise ValueError(f"series must be (batch, n_patches * {self.patch}), got shape "
                             f"{series.shape}; cut it to a multiple of patch={self.patch}")
        b, t = series.shape
        n = t // self.patch
        x = nn.Dense(self.c.d_model, name="patch_in")(series.reshape(b, n, self.patch))
        x = site(self, "embed", x)
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n))
        x = _Backbone(self.c, self.centroids, name="backbone")(x, positions, jnp.ones((b, n)))
        x = _select(x, output_positions)
        return site(self, "forecast", nn.Dense(self.patch, name="patch_out")(x))


class VectorField(nn.Module):
    """``f(s, h) = W_2 tanh(W_1 [h, s] + b_1) + b_2``, the ODE's right-hand side."""

    hidden: int

    @nn.compact
    def __call__(self, s, h):
        z = jnp.concatenate([h, jnp.broadcast_to(s, h.shape[:-1] + (1,))], axis=-1)
        z = jnp.tanh(nn.Dense(self.hidden, name="hidden")(z))
        return nn.Dense(h.shape[-1], name="out")(z)


def solve_ode(field: VectorField, params, h0, elapsed, steps: int):
    """``h(s)`` at each ``elapsed`` (batch, M), ascending and > 0, for ``dh/ds =
    field.apply(params, s, h)``, ``h(0) = h0`` (batch, d): Tsit5 with ``steps`` equal steps
    to the last target, dense interpolation between them -> (batch, M, d)."""
    term = diffrax.ODETerm(lambda s, h, p: field.apply({"params": p}, s, h))

    def one(y0, ts):
        t1 = ts[-1]
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), t0=0.0, t1=t1, dt0=t1 / steps,
                                  y0=y0, args=params, saveat=diffrax.SaveAt(ts=ts),
                                  stepsize_controller=diffrax.ConstantStepSize(),
                                  max_steps=2 * steps)
        return sol.ys

    return jax.vmap(one)(h0, elapsed)


class MiraForecaster(_Family, nn.Module):
    """``(values, times, target_times, observed=None)`` -> forecasts (batch, M) at the
    target times. ``values``/``times`` (batch, N) with times ascending (normalised, e.g. the
    context spans [0, 1)); ``observed`` (batch, N) 1 = observed, 0 = missing (its value is
    ignored; the last must be observed); ``target_times`` (batch, M) ascending, after
    ``times[:, -1]``. ``rope``: ``"continuous"`` (angles ``omega_i * time_scale * t``) or
    ``"index"`` (``omega_i * n``); ``head``: ``"ode"`` or ``"direct"`` (an MLP of the last
    state and the elapsed time)."""

    c: ForecasterConfig
    rope: str = "continuous"
    head: str = "ode"
    time_scale: float = 48.0
    ode_hidden: int = 64
    ode_steps: int = 8

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": _spec("batch pos d_model", "observation embedding (value, observed flag)"),
        **_BLOCK_SITES,
        "final_norm": _spec("batch pos d_model", "residual after the final norm"),
        "last_hidden": _spec("batch d_model", "final state at the last observation, h(t_N)"),
        "head.states": _spec("batch target d_model", "ODE (or direct) state at each target"),
        "forecast": _spec("batch target", "forecast at each target time"),
    }

    def _check(self, values, times, target_times, observed):
        if self.rope not in ROPES or self.head not in HEADS:
            raise ValueError(f"rope={self.rope!r}, head={self.head!r}: choose rope from "
                             f"{ROPES} and head from {HEADS}")
        if values.ndim != 2 or times.shape != values.shape or (
                observed is not None and observed.shape != values.shape):
            raise ValueError(f"values {values.shape}, times {times.shape} and observed "
                             f"{None if observed is None else observed.shape} must all be "
                             "(batch, n_observations)")
        if target_times.ndim != 2 or target_times.shape[0] != values.shape[0]:
            raise ValueError(f"target_times must be (batch={values.shape[0]}, n_targets), "
                             f"got {target_times.shape}")

    @nn.compact
    def __call__(self, values, times, target_times, observed=None, output_positions=None):
        self._check(values, times, target_times, observed)
        c = self.c
        observed = jnp.ones_like(values) if observed is None else observed
        features = jnp.stack([values * observed, observed], axis=-1)
        x = site(self, "embed", nn.Dense(c.d_model, name="value_in")(features))
        n = values.shape[1]
        positions = (times * self.time_scale if self.rope == "continuous"
                     else jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), values.shape))
        x = _Backbone(c, name="backbone")(x, positions, observed)
        h = site(self, "last_hidden", x[:, -1])
        elapsed = target_times - times[:, -1:]
        if self.head == "ode":
            field = VectorField(self.ode_hidden, name="ode_field")
            field(jnp.zeros(()), h)  # creates its parameters at init; a no-op in apply
            states = solve_ode(VectorField(self.ode_hidden), field.variables["params"], h,
                               elapsed, self.ode_steps)
        else:
            z = jnp.concatenate([jnp.broadcast_to(h[:, None], (*elapsed.shape, c.d_model)),
                                 elapsed[..., None]], axis=-1)
            z = jnp.tanh(nn.Dense(self.ode_hidden, name="direct_hidden")(z))
            states = h[:, None] + nn.Dense(c.d_model, name="direct_out")(z)
        states = _select(site(self, "head.states", states), output_positions)
        return site(self, "forecast", nn.Dense(1, name="value_out")(states)[..., 0])
