"""Vision transformer (Dosovitskiy et al., 2021): patch embedding, class token or mean
pooling, pre-norm blocks with the decoder's site names, so the TransformerLens-named grids
of :mod:`mechinterp.patching` run unchanged over (layer, patch position, head).

``images (batch, height, width, channels)`` -> ``patch_size`` x ``patch_size`` patches,
linearly embedded, plus learned position embeddings (position 0 is the class token when
``pool="cls"``) -> ``n_layers`` blocks ``x + attn(norm(x))``, ``x + mlp(norm(x))`` -> final
norm -> class token or mean over tokens -> linear classifier. Attention is the shared
:class:`~mechinterp.models.layers.Attention` with a full (non-causal) mask, or SLAB's
simplified linear attention (``attention="linear"``); norms are LayerNorm or SLAB's
BatchNorm variants (``norm=``, :mod:`mechinterp.models.slab`). ``load_hf`` reads
``ViTForImageClassification`` checkpoints (:mod:`mechinterp.models.vit_hf`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .decoder import Decoder
from .layers import MLP, Attention
from .slab import NORMS, LinearAttention, make_norm

ATTENTIONS = ("softmax", "linear")
POOLS = ("cls", "mean")
_SHARED = ("resid_pre", "attn.pattern", "attn.z",
           "attn.head_out", "attn_out", "resid_mid", "mlp.hidden", "mlp_out", "resid_post",
           "final_norm")

_HEADS = ("layer", "batch", "pos", "head", "d_head")
_KV_HEADS = ("layer", "batch", "pos", "kv_head", "d_head")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What a block needs of its :class:`ViT` (hashable: linen module fields)."""

    d_model: int
    n_heads: int
    d_mlp: int
    norm: str
    norm_eps: float
    attention: str
    grid: int
    dwc_kernel: int
    stats: str


class ViTBlock(nn.Module):
    """One pre-norm block; ``(x, mask, train, norm_lambda) -> (x, None)`` for ``nn.scan``."""

    c: BlockConfig

    @nn.compact
    def __call__(self, x, mask, train, norm_lambda):
        c = self.c
        x = site(self, "resid_pre", x)
        h = make_norm(c, "norm1")(x, train, norm_lambda)
        d_head = c.d_model // c.n_heads
        if c.attention == "softmax":
            a, _ = Attention(c.n_heads, c.n_heads, d_head, qkv_bias=True, name="attn")(
                h, None, mask)
        else:
            a = LinearAttention(c.n_heads, d_head, c.grid, c.dwc_kernel, name="attn")(h)
        a = a + self.param("attn_out_bias", nn.initializers.zeros, (c.d_model,))
        x = site(self, "resid_mid", x + site(self, "attn_out", a))
        h = make_norm(c, "norm2")(x, train, norm_lambda)
        m = site(self, "mlp_out", MLP(c.d_mlp, name="mlp")(h))
        return site(self, "resid_post", x + m), None


class ViT(nn.Module):
    """The ViT classifier. ``norm``: one of :data:`mechinterp.models.slab.NORMS`;
    ``attention``: ``"softmax"`` or ``"linear"``; ``norm_eps`` is the LayerNorm epsilon
    (1e-12 in Hugging Face ViTs); ``stats`` is where BatchNorm keeps running averages."""

    image_size: int = 8
    patch_size: int = 2
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 64
    n_classes: int = 10
    pool: str = "cls"
    norm: str = "layer"
    attention: str = "softmax"
    norm_eps: float = 1e-6
    dwc_kernel: int = 3
    scan_layers: bool = True
    stats: str = "batch_stats"

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": SiteSpec(("batch", "pos", "d_model"),
                          "patch (and class token) embeddings plus position embeddings"),
        "attn.q": SiteSpec(_HEADS, "queries, after their bias"),
        "attn.k": SiteSpec(_KV_HEADS, "keys, after their bias (kv_head = head: no grouping)"),
        "attn.v": SiteSpec(_KV_HEADS, "values, after their bias"),
        **{name: Decoder.SITES[name] for name in _SHARED},
        "pooled": SiteSpec(("batch", "d_model"), "class token or mean over tokens, after the "
                                                 "final norm: the pre-logits"),
        "logits": SiteSpec(("batch", "class"), "class logits"),
    }

    @property
    def block_config(self) -> BlockConfig:
        return BlockConfig(self.d_model, self.n_heads, self.d_mlp, self.norm, self.norm_eps,
                           self.attention, self.image_size // self.patch_size,
                           self.dwc_kernel, self.stats)

    def __post_init__(self):
        for field, value, allowed in (("pool", self.pool, POOLS), ("norm", self.norm, NORMS),
                                      ("attention", self.attention, ATTENTIONS)):
            if value not in allowed:
                raise ValueError(f"ViT {field}={value!r} is not one of {allowed}")
        if self.image_size % self.patch_size or self.d_model % self.n_heads:
            raise ValueError(
                f"ViT needs image_size ({self.image_size}) divisible by patch_size "
                f"({self.patch_size}) and d_model ({self.d_model}) by n_heads ({self.n_heads})")
        super().__post_init__()

    @nn.compact
    def __call__(self, images, train: bool = False, norm_lambda=0.0):
        size = (self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:3]) != size:
            raise ValueError(f"ViT takes images (batch, {size[0]}, {size[1]}, channels), got "
                             f"shape {images.shape}")
        p = self.patch_size
        x = nn.Conv(self.d_model, (p, p), strides=(p, p), padding="VALID",
                    name="patch_embed")(jnp.asarray(images, jnp.float32))
        x = x.reshape(x.shape[0], -1, self.d_model)
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.d_model))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.d_model)), x], 1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        x = site(self, "embed", x)
        mask = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        if self.scan_layers:
            stack = nn.scan(
                ViTBlock,
                variable_axes={"params": 0, self.stats: 0, INTERMEDIATES: 0, INTERVENTIONS: 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast,) * 3,
                length=self.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(self.block_config, name="layers")(x, mask, train, norm_lambda)
        else:
            for i in range(self.n_layers):
                x, _ = ViTBlock(self.block_config, name=f"layers_{i}")(x, mask, train, norm_lambda)
        x = site(self, "final_norm", make_norm(self.block_config, "norm")(x, train, norm_lambda))
        pooled = site(self, "pooled", x[:, 0] if self.pool == "cls" else x.mean(axis=1))
        return site(self, "logits", nn.Dense(self.n_classes, name="head")(pooled))

    def layer_structure(self) -> LayerStructure:  # HasLayers
        return LayerStructure(
            n_layers=self.n_layers, residual=("resid_pre", "resid_mid", "resid_post"),
            sublayers={"attn": SublayerSites("resid_pre", "attn_out", "resid_mid"),
                       "mlp": SublayerSites("resid_mid", "mlp_out", "resid_post")})
