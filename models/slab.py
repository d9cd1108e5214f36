"""SLAB blocks for the ViT (Guo et al., 2024): BatchNorm variants that replace LayerNorm,
their folding into the next linear layer for inference, and simplified linear attention.

- RepBN: ``RepBN(x) = BN(x) + alpha x`` (``alpha`` learned, starts at 1).
- PRepBN: ``lambda LN(x) + (1 - lambda) RepBN(x)``, with ``lambda`` decaying linearly from 1
  to 0 over training (:func:`prepbn_lambda`); at ``lambda = 0`` (inference) it is RepBN.
- In inference BN and RepBN are a per-channel affine map, which :func:`fold_norms` folds
  into the next linear layer (q/k/v, the MLP's up projection, the classifier).
- Simplified linear attention: ``z_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) /
  (phi(q_i)^T sum_j phi(k_j)) + DWC(V)_i`` with ``phi = ReLU`` and a depthwise convolution
  of the values over the patch grid (the class token, if any, gets no DWC term).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechinterp.sites import site, site_is_used

from .layers import BatchNorm, logical_param, merge_batch_stats

NORMS = ("layer", "batch", "repbn", "prepbn", "folded")
FOLDABLE = ("batch", "repbn", "prepbn")


def prepbn_lambda(step, total_steps):
    """PRepBN's ``lambda`` at ``step``: ``1 - step / total_steps``, then 0."""
    return jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)


class Norm(nn.Module):
    """One norm of kind ``kind`` (:data:`NORMS`): ``(x, train, norm_lambda) -> x``.
    ``"folded"`` is the identity left where :func:`fold_norms` moved a norm into the next
    linear layer. LayerNorm parameters are ``scale``/``bias``; BatchNorm's live in ``bn``."""

    kind: str
    eps: float = 1e-6
    stats: str = "batch_stats"

    @nn.compact
    def __call__(self, x, train: bool = False, norm_lambda=0.0):
        if self.kind == "folded":
            return x
        out = 0.0
        if self.kind in ("batch", "repbn", "prepbn"):
            out = BatchNorm(stats=self.stats, name="bn")(x, train)
        if self.kind in ("repbn", "prepbn"):
            out = out + self.param("alpha", nn.initializers.ones, ()) * x
        if self.kind in ("layer", "prepbn"):
            h = x.astype(jnp.float32)
            mean = h.mean(-1, keepdims=True)
            var = jnp.mean(jnp.square(h - mean), -1, keepdims=True)
            ln = (h - mean) * jax.lax.rsqrt(var + self.eps)
            ln = ln * self.param("scale", nn.initializers.ones, (x.shape[-1],))
            ln = (ln + self.param("bias", nn.initializers.zeros, (x.shape[-1],))).astype(x.dtype)
            out = ln if self.kind == "layer" else norm_lambda * ln + (1 - norm_lambda) * out
        return out


def make_norm(config, name: str) -> Norm:
    """The norm ``config`` (a ViT block config: ``norm``, ``norm_eps``, ``stats``) asks for."""
    return Norm(config.norm, config.norm_eps, config.stats, name=name)


class LinearAttention(nn.Module):
    """Simplified linear attention (module docstring) with q/k/v biases; parameters named as
    :class:`~mechinterp.models.layers.Attention`'s. Sites: ``attn.q``, ``attn.k``,
    ``attn.v`` (before the ReLU feature map), ``attn.z`` (attention plus DWC term),
    ``attn.head_out``. Cost is linear in the number of tokens."""

    n_heads: int
    d_head: int
    grid: int
    kernel: int = 3
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, e = x.shape
        h, d = self.n_heads, self.d_head
        zeros = nn.initializers.zeros
        proj = {}
        for name in ("q", "k", "v"):
            heads = "heads" if name == "q" else "kv_heads"
            w = logical_param(self, f"w{name}", ("embed", heads, "head_dim"), (e, h, d))
            bias = logical_param(self, f"b{name}", (heads, "head_dim"), (h, d), zeros)
            proj[name] = site(self, f"attn.{name}", jnp.einsum("bte,ehd->bthd", x, w) + bias)
        wo = logical_param(self, "wo", ("heads", "head_dim", "embed"), (h, d, e))
        fq, fk, v = nn.relu(proj["q"]), nn.relu(proj["k"]), proj["v"]
        kv = jnp.einsum("bshd,bshe->bhde", fk, v)
        norm = jnp.einsum("bthd,bhd->bth", fq, fk.sum(axis=1))[..., None] + self.eps
        z = jnp.einsum("bthd,bhde->bthe", fq, kv) / norm
        extra = t - self.grid * self.grid
        grid_v = v[:, extra:].reshape(b, self.grid, self.grid, h * d)
        dwc = nn.Conv(h * d, (self.kernel, self.kernel), feature_group_count=h * d,
                      name="dwc")(grid_v).reshape(b, t - extra, h, d)
        z = site(self, "attn.z", z + jnp.pad(dwc, ((0, 0), (extra, 0), (0, 0), (0, 0))))
        out = jnp.einsum("bthd,hde->bte", z, wo)
        if site_is_used(self, "attn.head_out"):
            per_head = jnp.einsum("bthd,hde->bthe", z, wo)
            out = out + (site(self, "attn.head_out", per_head) - per_head).sum(axis=2)
        return out


def _affine(norm: dict, eps: float) -> tuple[Any, Any]:
    """``(a, c)`` with ``norm(x) == a * x + c`` for an inference-mode BN/RepBN/PRepBN(0)."""
    bn = norm["bn"]
    factor = bn["scale"] * jax.lax.rsqrt(bn["var"] + eps)
    alpha = norm.get("alpha", 0.0)
    return factor + jnp.asarray(alpha)[..., None], bn["bias"] - bn["mean"] * factor


def _fold_attention(attn: dict, a, c) -> dict:
    out = dict(attn)
    for name in ("q", "k", "v"):
        w = attn[f"w{name}"]
        out[f"w{name}"] = a[..., :, None, None] * w
        out[f"b{name}"] = attn[f"b{name}"] + jnp.einsum("...e,...ehd->...hd", c, w)
    return out


def _fold_dense(layer: dict, a, c, kernel: str, bias: str) -> dict:
    w = layer[kernel]
    return {**layer, kernel: a[..., :, None] * w,
            bias: layer[bias] + jnp.einsum("...e,...em->...m", c, w)}


def fold_norms(model, variables: dict) -> tuple[Any, dict]:
    """``(model, params)`` with every inference-mode BatchNorm/RepBN (PRepBN at
    ``lambda = 0``) folded into the next linear layer: ``norm="folded"``, numerically the
    unfolded network in inference mode (``variables`` holds ``params`` and ``batch_stats``).
    """
    if model.norm not in FOLDABLE:
        raise ValueError(f"fold_norms folds BatchNorm-based norms {FOLDABLE}; this ViT has "
                         f"norm={model.norm!r} (LayerNorm depends on each token: not foldable)")
    params = merge_batch_stats(variables)
    eps = 1e-5  # BatchNorm's default epsilon, as used by Norm
    blocks = [k for k in params if k == "layers" or k.startswith("layers_")]
    for key in blocks:
        block = dict(params[key])
        a, c = _affine(block.pop("norm1"), eps)
        block["attn"] = _fold_attention(block["attn"], a, c)
        a, c = _affine(block.pop("norm2"), eps)
        block["mlp"] = _fold_dense(block["mlp"], a, c, "up", "up_bias")
        params[key] = block
    a, c = _affine(params.pop("norm"), eps)
    params["head"] = _fold_dense(params["head"], a, c, "kernel", "bias")
    return model.clone(norm="folded"), params
