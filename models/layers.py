"""Shared transformer blocks: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.

Every family reuses these; none of them knows about a particular family's config. Weights
are explicit einsum kernels carrying logical axis names (``'vocab'``, ``'embed'``,
``'heads'``, ``'kv_heads'``, ``'head_dim'``, ``'mlp'``) so the training code can shard them
with one rules table. Activations worth studying go through :func:`mechinterp.sites.site`.

Numerics follow the Hugging Face reference implementations: RMSNorm normalizes in float32,
RoPE angles are computed in float32, softmax runs in float32; everything else runs in the
compute ``dtype``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.sites import site, site_is_used

Array = jax.Array
DType = Any

DEFAULT_INIT = nn.initializers.normal(stddev=0.02)
# Masked attention scores: the most negative float32 (finite, so a fully masked row gives a
# uniform distribution instead of NaN).
MASKED_SCORE = float(np.finfo(np.float32).min)

# RoPE scaling types :func:`rope_inv_freq` implements, with the keys each one needs.
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def logical_param(module: nn.Module, name: str, axes: tuple[str, ...],
                  shape: tuple[int, ...], init: Callable = DEFAULT_INIT) -> Array:
    """A parameter of ``module`` with logical axis names ``axes``, stored in
    ``module.param_dtype`` and returned cast to the compute dtype ``module.dtype``."""
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape,
                         module.param_dtype)
    return jnp.asarray(value, module.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (no bias, no mean subtraction).

    Normalizes in float32, casts back to the input dtype, then multiplies the learned scale
    (as Hugging Face's ``LlamaRMSNorm``). ``axis_name`` is the scale's logical axis.
    """

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = logical_param(self, "scale", (self.axis_name,), (x.shape[-1],),
                              nn.initializers.ones)
        return rms_normalize(x, scale, self.eps)


def rms_normalize(x: Array, weight: Array, eps: float, frozen: bool = False) -> Array:
    """:class:`RMSNorm` as a function: ``weight * x / sqrt(mean(x^2) + eps)`` (normalized in
    float32). ``frozen``: the factor ``1 / sqrt(mean(x^2) + eps)`` is a constant for
    differentiation (``stop_gradient``), so the norm is linear in ``x``."""
    h = x.astype(jnp.float32)
    factor = jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    if frozen:
        factor = jax.lax.stop_gradient(factor)
    return weight * (h * factor).astype(x.dtype)


def _freeze_rms_norm(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, RMSNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    weight = nn.meta.unbox(module.get_variable("params", "scale"))
    return rms_normalize(args[0], jnp.asarray(weight, module.dtype), module.eps, frozen=True)


def frozen_rms_norms() -> contextlib.AbstractContextManager:
    """A context (a Flax method interceptor) in which every :class:`RMSNorm` treats its
    ``1 / rms(x)`` factor as a constant for differentiation: the forward is unchanged and
    the norm is linear in ``x`` around the input (attribution graphs)."""
    return nn.intercept_methods(_freeze_rms_norm)


def rope_inv_freq(d_head: int, theta: float,
                  scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """Inverse frequencies (``d_head // 2``, float32) for RoPE, optionally scaled.

    ``scaling`` is ``None`` (plain RoPE) or a mapping with ``rope_type`` ``"linear"``
    (divide every frequency by ``factor``) or ``"llama3"`` (Llama 3.1's smooth interpolation
    between long and short wavelengths).
    """
    exponents = np.arange(0, d_head, 2, dtype=np.float32) / np.float32(d_head)
    inv_freq = (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"rope_scaling rope_type={kind!r} is not supported; supported: "
            f"{sorted(ROPE_SCALING_KEYS)} (or rope_scaling=None for plain RoPE)"
        )
    factor = np.float32(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low = np.float32(scaling["low_freq_factor"])
    high = np.float32(scaling["high_freq_factor"])
    old_len = np.float32(scaling["original_max_position_embeddings"])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: Array, inv_freq: np.ndarray, dtype: DType) -> tuple[Array, Array]:
    """``(cos, sin)`` of shape ``positions.shape + (d_head,)``: float32 math, cast to ``dtype``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotate ``x`` (batch, pos, head, d_head) by ``rope`` = (cos, sin) (batch, pos, d_head).

    Uses the "rotate half" layout (first half of ``d_head`` pairs with the second half), as
    Hugging Face's Llama checkpoints do, not the interleaved one.
    """
    cos, sin = (a[:, :, None, :] for a in rope)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def attention_weights(qg: Array, k: Array, mask: Array, dtype: DType) -> Array:
    """Softmax attention probabilities (batch, kv_head, group, query_pos, key_pos) in
    ``dtype``: ``softmax(q k^T / sqrt(d_head))`` over the keys ``mask`` allows.

    ``qg``: queries grouped by the kv head they share (batch, pos, kv_head, group, d_head);
    ``k``: (batch, key_pos, kv_head, d_head); ``mask``: boolean (batch, query_pos, key_pos).
    Scores are scaled in ``dtype``, masked and normalized in float32.
    """
    scale = jnp.asarray(qg.shape[-1] ** -0.5, dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * scale
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), MASKED_SCORE)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _attend(qg: Array, k: Array, v: Array, mask: Array, dtype: DType) -> Array:
    """``attention_weights(qg, k, mask, dtype) @ v`` (batch, pos, kv_head, group, d_head), the
    weights recomputed in the backward pass instead of saved.

    Saved, they would keep two (batch, heads, seq, seq) arrays per layer (the float32
    ``exp`` of the softmax and the weights) alive from the forward to the backward pass:
    the 125M-parameter decoder's train step at batch 4, seq 2048 asked for 131 GiB of temp
    memory on an H200 (28.8 GiB on CPU; 10.7 GiB recomputed). Recomputing costs one more
    q k^T product and softmax per layer, as flash attention's backward does.
    """
    return jnp.einsum("bkgts,bskd->btkgd", attention_weights(qg, k, mask, dtype), v)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, optional q/k/v bias and q/k RMSNorm.

    Sites: ``attn.q`` (pos, head, d_head) and ``attn.k``/``attn.v`` (pos, kv_head, d_head),
    all before RoPE; ``attn.pattern`` (head, query_pos, key_pos); ``attn.z`` (pos, head,
    d_head); ``attn.head_out`` (pos, head, d_model), computed only when read or edited.
    When no apply reads or edits ``attn.pattern``, the attention weights are not kept for
    the backward pass but recomputed there (:func:`_attend`); the numbers are the same.

    ``__call__(x, rope, mask, cache=None, cache_index=None)``: ``rope`` is ``(cos, sin)``
    from :func:`rope_angles` or ``None`` (no rotary embedding); ``mask`` is boolean
    (batch, query_pos, key_pos), True where a query may attend. With ``cache`` =
    ``(k, v)`` of shape (batch, max_len, kv_head, d_head), the new (rotated) keys and values
    are written at slot ``cache_index`` and the queries attend over all ``max_len`` slots.
    Returns ``(out, new_cache)``; ``new_cache`` is ``None`` without a cache.
    """

    n_heads: int
    n_kv_heads: int
    d_head: int
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array] | None, mask: Array,
                 cache: tuple[Array, Array] | None = None,
                 cache_index: Array | None = None):
        d_model = x.shape[-1]
        h, kv, d = self.n_heads, self.n_kv_heads, self.d_head
        wq = logical_param(self, "wq", ("embed", "heads", "head_dim"), (d_model, h, d))
        wk = logical_param(self, "wk", ("embed", "kv_heads", "head_dim"), (d_model, kv, d))
        wv = logical_param(self, "wv", ("embed", "kv_heads", "head_dim"), (d_model, kv, d))
        wo = logical_param(self, "wo", ("heads", "head_dim", "embed"), (h, d, d_model))

        q = jnp.einsum("bte,ehd->bthd", x, wq)
        k = jnp.einsum("bte,ehd->bthd", x, wk)
        v = jnp.einsum("bte,ehd->bthd", x, wv)
        if self.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + logical_param(self, "bq", ("heads", "head_dim"), (h, d), zeros)
            k = k + logical_param(self, "bk", ("kv_heads", "head_dim"), (kv, d), zeros)
            v = v + logical_param(self, "bv", ("kv_heads", "head_dim"), (kv, d), zeros)
        if self.qk_norm:
            norm = dict(eps=self.norm_eps, axis_name="head_dim", dtype=self.dtype,
                        param_dtype=self.param_dtype)
            q = RMSNorm(**norm, name="q_norm")(q)
            k = RMSNorm(**norm, name="k_norm")(k)
        q = site(self, "attn.q", q)
        k = site(self, "attn.k", k)
        v = site(self, "attn.v", v)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)

        new_cache = None
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            new_cache = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)

        # Group query heads by the kv head they share: head index = kv_head * group + g.
        b, t = q.shape[:2]
        s = k.shape[1]
        groups = h // kv
        qg = q.reshape(b, t, kv, groups, d)
        if site_is_used(self, "attn.pattern"):
            probs = attention_weights(qg, k, mask, self.dtype)
            probs = site(self, "attn.pattern", probs.reshape(b, h, t, s))
            z = jnp.einsum("bkgts,bskd->btkgd", probs.reshape(b, kv, groups, t, s), v)
        else:  # nobody reads or edits the pattern: do not keep it for the backward pass
            z = _attend(qg, k, v, mask, self.dtype)
        z = site(self, "attn.z", z.reshape(b, t, h, d))

        out = jnp.einsum("bthd,hde->bte", z, wo)
        if site_is_used(self, "attn.head_out"):
            per_head = jnp.einsum("bthd,hde->bthe", z, wo)
            edited = site(self, "attn.head_out", per_head)
            out = out + (edited - per_head).sum(axis=2)
        return out, new_cache


class GatedMLP(nn.Module):
    """``down(act(x @ gate) * (x @ up))``: the SwiGLU MLP of LLaMA-style models.

    Sites: ``mlp.pre`` (the gate pre-activation) and ``mlp.hidden`` (``act(gate) * up``,
    the neurons).
    """

    d_mlp: int
    activation: Callable[[Array], Array] = nn.silu
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_model = x.shape[-1]
        gate = logical_param(self, "gate", ("embed", "mlp"), (d_model, self.d_mlp))
        up = logical_param(self, "up", ("embed", "mlp"), (d_model, self.d_mlp))
        down = logical_param(self, "down", ("mlp", "embed"), (self.d_mlp, d_model))
        pre = site(self, "mlp.pre", jnp.einsum("bte,em->btm", x, gate))
        hidden = self.activation(pre) * jnp.einsum("bte,em->btm", x, up)
        hidden = site(self, "mlp.hidden", hidden)
        return jnp.einsum("btm,me->bte", hidden, down)


class MLP(nn.Module):
    """``down(act(x @ up + up_bias)) + down_bias``: the two-layer MLP of ViT and BERT-style
    blocks. Site: ``mlp.hidden`` (the neurons, after the activation)."""

    d_mlp: int
    activation: Callable[[Array], Array] = functools.partial(nn.gelu, approximate=False)
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d_model = x.shape[-1]
        zeros = nn.initializers.zeros
        up = logical_param(self, "up", ("embed", "mlp"), (d_model, self.d_mlp))
        up_bias = logical_param(self, "up_bias", ("mlp",), (self.d_mlp,), zeros)
        down = logical_param(self, "down", ("mlp", "embed"), (self.d_mlp, d_model))
        down_bias = logical_param(self, "down_bias", ("embed",), (d_model,), zeros)
        hidden = site(self, "mlp.hidden",
                      self.activation(jnp.einsum("bte,em->btm", x, up) + up_bias))
        return jnp.einsum("btm,me->bte", hidden, down) + down_bias


class BatchNorm(nn.Module):
    """Batch normalization over every axis but the last (Ioffe & Szegedy, 2015):
    ``y = scale * (x - mean) / sqrt(var + eps) + bias``.

    ``train=True`` normalizes with the batch's mean and (biased) variance and, when the
    ``stats`` collection is mutable, updates the running averages there
    (``r <- momentum * r + (1 - momentum) * batch value``); ``train=False`` uses the running
    averages. ``stats`` names the collection holding them: ``"batch_stats"`` for training,
    ``"params"`` for analysis (see :func:`merge_batch_stats`), so the analysis core, which
    passes only ``params``, runs the network in inference mode.
    """

    momentum: float = 0.9
    eps: float = 1e-5
    stats: str = "batch_stats"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable(self.stats, "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable(self.stats, "var", jnp.ones, (features,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            h = x.astype(jnp.float32)
            mean = h.mean(axes)
            var = jnp.mean(jnp.square(h - mean), axes)
            if not self.is_initializing() and self.is_mutable_collection(self.stats):
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * var
        else:
            mean, var = running_mean.value, running_var.value
        factor = scale * jax.lax.rsqrt(var + self.eps)
        return (x * factor + (bias - mean * factor)).astype(x.dtype)


def merge_batch_stats(variables: Mapping[str, Any]) -> dict:
    """``variables['params']`` with ``variables['batch_stats']`` merged in at the same module
    paths: the parameters of a model whose :class:`BatchNorm` layers use ``stats="params"``."""

    def merge(a, b):
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out.get(key, {}), value) if isinstance(value, Mapping) else value
        return out

    variables = nn.meta.unbox(variables)
    return merge(variables["params"], variables.get("batch_stats", {}))
