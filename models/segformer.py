"""SegFormer-style segmentation transformer (Xie et al., 2021): a hierarchical encoder and
a light all-MLP decoder, sizes as :class:`SegConfig` presets (``teacher()``/``student()``).

Stage ``i`` (1-based): an overlapping patch embedding (strided conv, kernel
``2 * stride - 1``, LayerNorm) -> ``depths[i]`` blocks ``x + attn(norm(x))``,
``x + mix_ffn(norm(x))`` -> LayerNorm: the stage's feature map. Attention is efficient
self-attention: keys and values come from the tokens reduced by a ``sr`` x ``sr`` strided
conv (and LayerNorm), ``softmax(q k^T / sqrt(d)) v`` with ``N / sr^2`` keys. Mix-FFN is
``down(gelu(dwconv3x3(up(x))))``. The decoder maps every stage to ``d_decoder`` channels,
upsamples bilinearly to stage 1's grid, concatenates (deepest first), fuses with a linear
layer + ReLU and predicts classes, upsampled to the image. Every activation is a site
named by stage (``s2.attn.pattern``); blocks are unrolled (``s{i}_block_{j}``), so per-block
sites stack on a ``layer`` axis per stage and XLA's cost analysis counts every block.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechinterp.sites import SiteSpec, site

from .layers import attention_weights, logical_param

_TOKENS = ("layer", "batch", "pos", "d_model")
_MAP = ("batch", "height", "width", "channel")
MAX_STAGES = 4


@dataclasses.dataclass(frozen=True)
class SegConfig:
    """Sizes of a :class:`SegFormer`; one entry per stage in ``dims`` ... ``strides``."""

    dims: tuple[int, ...] = (16, 32, 48, 64)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    heads: tuple[int, ...] = (1, 2, 3, 4)
    sr_ratios: tuple[int, ...] = (2, 1, 1, 1)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int = 4
    d_decoder: int = 32
    n_classes: int = 7
    image_size: int = 32

    @classmethod
    def student(cls, **overrides) -> "SegConfig":
        """A MiT-B0-like student (half the teacher's widths, one block per stage)."""
        return cls(**overrides)

    @classmethod
    def teacher(cls, **overrides) -> "SegConfig":
        """A MiT-B2-like teacher: twice the student's widths and heads, two blocks per
        stage, a wider decoder."""
        return cls(**{"dims": (32, 64, 96, 128), "depths": (2, 2, 2, 2),
                      "heads": (2, 4, 6, 8), "d_decoder": 128, **overrides})

    def grids(self) -> tuple[int, ...]:
        """Each stage's grid side."""
        out, side = [], self.image_size
        for s in self.strides:
            side //= s
            out.append(side)
        return tuple(out)

    def check(self) -> None:
        n = len(self.dims)
        fields = ("depths", "heads", "sr_ratios", "strides")
        if not 1 <= n <= MAX_STAGES or any(len(getattr(self, f)) != n for f in fields):
            raise ValueError(f"SegConfig needs 1..{MAX_STAGES} stages and one entry per stage "
                             f"in dims, {', '.join(fields)}; got {self}")
        side = self.image_size
        for i, (d, h, sr, s) in enumerate(zip(self.dims, self.heads, self.sr_ratios,
                                              self.strides), 1):
            if side % s:
                raise ValueError(f"stage {i}: grid side {side} is not divisible by its stride "
                                 f"{s}; pick image_size divisible by prod(strides)")
            side //= s
            if d % h or side % sr:
                raise ValueError(f"stage {i}: dims ({d}) must be divisible by heads ({h}) and "
                                 f"the grid side ({side}) by sr_ratio ({sr})")


def _stage_sites(i: int) -> dict[str, SiteSpec]:
    p = f"s{i}."
    return {
        p + "patch_embed": SiteSpec(_MAP, f"stage {i} overlapping patch embedding (after its "
                                          "LayerNorm)"),
        p + "resid_pre": SiteSpec(_TOKENS, "tokens entering the block"),
        p + "attn.pattern": SiteSpec(("layer", "batch", "head", "query_pos", "key_pos"),
                                     "attention over the spatially reduced keys"),
        p + "attn.z": SiteSpec(("layer", "batch", "pos", "head", "d_head"),
                               "pattern-weighted values per head"),
        p + "attn_out": SiteSpec(_TOKENS, "efficient self-attention output"),
        p + "resid_mid": SiteSpec(_TOKENS, "tokens after attention"),
        p + "mlp.hidden": SiteSpec(("layer", "batch", "pos", "d_mlp"),
                                   "Mix-FFN neurons: gelu(dwconv(up(x)))"),
        p + "mlp_out": SiteSpec(_TOKENS, "Mix-FFN output"),
        p + "resid_post": SiteSpec(_TOKENS, "tokens leaving the block"),
        p + "features": SiteSpec(_MAP, f"stage {i} feature map (after the stage's LayerNorm)"),
        f"dec.s{i}": SiteSpec(_MAP, f"decoder: stage {i} projected, upsampled to stage 1"),
    }


def upsample(x: jax.Array, side: int) -> jax.Array:
    """Bilinear resize of (batch, h, w, c) to (batch, side, side, c): half-pixel centres,
    edges clamped (PyTorch's ``align_corners=False``)."""
    return jax.image.resize(x, (x.shape[0], side, side, x.shape[-1]), "bilinear")


class SRAttention(nn.Module):
    """Efficient self-attention: queries from every token, keys and values from the
    ``sr`` x ``sr``-reduced grid (Eq. 2 of SegFormer: ``K = Linear(Reshape(N / R, C R)(K))``,
    done as a strided conv)."""

    n_heads: int
    sr_ratio: int
    side: int
    prefix: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        h, d = self.n_heads, c // self.n_heads
        zeros = nn.initializers.zeros
        params = {n: logical_param(self, n, ("embed", "heads", "head_dim"), (c, h, d))
                  for n in ("wq", "wk", "wv")}
        bias = {n: logical_param(self, n, ("heads", "head_dim"), (h, d), zeros)
                for n in ("bq", "bk", "bv")}
        wo = logical_param(self, "wo", ("heads", "head_dim", "embed"), (h, d, c))
        bo = logical_param(self, "bo", ("embed",), (c,), zeros)
        kv = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            grid = x.reshape(b, self.side, self.side, c)
            kv = nn.Conv(c, (r, r), strides=(r, r), padding="VALID", name="sr")(grid)
            kv = nn.LayerNorm(name="sr_norm")(kv.reshape(b, -1, c))
        q = jnp.einsum("bte,ehd->bthd", x, params["wq"]) + bias["bq"]
        k = jnp.einsum("bte,ehd->bthd", kv, params["wk"]) + bias["bk"]
        v = jnp.einsum("bte,ehd->bthd", kv, params["wv"]) + bias["bv"]
        mask = jnp.ones((b, t, k.shape[1]), bool)
        probs = attention_weights(q[:, :, :, None], k, mask, self.dtype)[:, :, 0]
        probs = site(self, self.prefix + "attn.pattern", probs)
        z = site(self, self.prefix + "attn.z", jnp.einsum("bhts,bshd->bthd", probs, v))
        return jnp.einsum("bthd,hde->bte", z, wo) + bo


class MixFFN(nn.Module):
    """``down(gelu(dwconv3x3(up(x))))``: a two-layer MLP with a depthwise conv on the
    token grid between its linear maps (SegFormer's Eq. 3)."""

    d_mlp: int
    side: int
    prefix: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        up = nn.Dense(self.d_mlp, name="up")(x).reshape(b, self.side, self.side, self.d_mlp)
        up = nn.Conv(self.d_mlp, (3, 3), padding="SAME", feature_group_count=self.d_mlp,
                     name="dwconv")(up)
        hidden = site(self, self.prefix + "mlp.hidden",
                      nn.gelu(up.reshape(b, t, self.d_mlp), approximate=False))
        return nn.Dense(c, name="down")(hidden)


class SegBlock(nn.Module):
    """One pre-norm block of a stage."""

    n_heads: int
    sr_ratio: int
    d_mlp: int
    side: int
    prefix: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.prefix
        x = site(self, p + "resid_pre", x)
        a = SRAttention(self.n_heads, self.sr_ratio, self.side, p, name="attn")(
            nn.LayerNorm(name="norm1")(x))
        x = site(self, p + "resid_mid", x + site(self, p + "attn_out", a))
        m = MixFFN(self.d_mlp, self.side, p, name="mlp")(nn.LayerNorm(name="norm2")(x))
        return site(self, p + "resid_post", x + site(self, p + "mlp_out", m))


class SegFormer(nn.Module):
    """``images (batch, size, size, 3)`` -> per-pixel class ``logits`` (batch, size, size,
    n_classes). ``config``: a :class:`SegConfig`."""

    config: SegConfig = SegConfig()

    SITES: ClassVar[dict[str, SiteSpec]] = {
        **{k: v for i in range(1, MAX_STAGES + 1) for k, v in _stage_sites(i).items()},
        "dec.fused": SiteSpec(_MAP, "decoder: relu(linear(concat of dec.s4 ... dec.s1))"),
        "logits": SiteSpec(("batch", "height", "width", "class"),
                           "class logits, upsampled to the image"),
    }

    def __post_init__(self):
        self.config.check()
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        want = (c.image_size, c.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"SegFormer takes images (batch, {want[0]}, {want[1]}, 3) "
                             f"(SegConfig.image_size={c.image_size}), got shape {images.shape}")
        x = jnp.asarray(images, jnp.float32)
        features = []
        for i, (dim, depth, heads, sr, stride, side) in enumerate(
                zip(c.dims, c.depths, c.heads, c.sr_ratios, c.strides, c.grids()), 1):
            k = 2 * stride - 1
            x = nn.Conv(dim, (k, k), strides=(stride, stride), padding=k // 2,
                        name=f"s{i}_patch_embed")(x)
            x = site(self, f"s{i}.patch_embed", nn.LayerNorm(name=f"s{i}_embed_norm")(x))
            b = x.shape[0]
            x = x.reshape(b, side * side, dim)
            for j in range(depth):
                x = SegBlock(heads, sr, dim * c.mlp_ratio, side, f"s{i}.",
                             name=f"s{i}_block_{j}")(x)
            x = nn.LayerNorm(name=f"s{i}_norm")(x).reshape(b, side, side, dim)
            features.append(site(self, f"s{i}.features", x))
        side = c.grids()[0]
        projected = [site(self, f"dec.s{i}", upsample(
            nn.Dense(c.d_decoder, name=f"dec_linear_s{i}")(f), side))
            for i, f in enumerate(features, 1)]
        fused = nn.Dense(c.d_decoder, name="dec_fuse")(jnp.concatenate(projected[::-1], -1))
        fused = site(self, "dec.fused", nn.relu(fused))
        logits = nn.Dense(c.n_classes, name="dec_classify")(fused)
        return site(self, "logits", upsample(logits, c.image_size))
