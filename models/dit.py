"""Diffusion transformer (Peebles & Xie, 2023), DiT-MoE (Fei et al., 2024) and a
joint-attention variant: every activation a site, the family protocol's layer structure.

``images (batch, H, W, C)``, ``t (batch,)`` in [0, 1], class ids ``y`` -> patchify ->
``n_layers`` adaLN-Zero blocks, with ``c = embed(t) + embed(y)`` and
``(shift, scale, gate) = Dense_zero-init(silu(c))`` per sublayer:
``x += gate1 * attn(LN(x) (1 + scale1) + shift1)``, ``x += gate2 * mlp(LN(x) (1 + scale2) +
shift2)`` -> adaLN final layer -> unpatchify: an output shaped like ``images`` (the flow
velocity of :mod:`mechinterp.models.diffusion`). ``n_experts > 0`` makes every MLP
DiT-MoE's sparse MoE (:class:`~mechinterp.models.moe.MoE`: softmax router, top-k weights
not renormalised, SwiGLU experts, a shared expert always added, balance loss
``alpha sum_i f_i P_i``, ``f_i = E count_i / (k N)``). ``cond_vocab > 0`` adds ``cond``
tokens (batch, n_cond) in one joint attention with the image tokens (positions
``0..n_cond-1``; MM-DiT simplified: the two streams share weights); ``attn_mask`` (batch,
query, key) restricts that attention (regional control).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .decoder import Decoder, MoEDecoder
from .layers import MLP, Attention, GatedMLP
from .moe import AUX_LOSS, MoE
from .vit import ViT

MLPS = ("gelu", "swiglu")
_MOE = ("moe.router_logits", "moe.router_probs", "moe.topk_indices", "moe.topk_weights",
        "moe.weights", "moe.expert_in", "moe.expert_out", "moe.shared_out")


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features of ``1000 t`` (DiT's ``TimestepEmbedder``): (batch,) -> (batch,
    dim), ``[cos(1000 t w_i), sin(1000 t w_i)]``, ``w_i = max_period^(-i / (dim / 2))``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(images, p: int):
    """(batch, H, W, C) -> (batch, H/p * W/p, p * p * C), patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, h: int, w: int, c: int):
    """The inverse of :func:`patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(name: str):
    return nn.LayerNorm(1e-6, use_bias=False, use_scale=False, name=name)


def gelu_tanh(x):
    """DiT's MLP activation: GELU, tanh approximation."""
    return nn.gelu(x, approximate=True)


@dataclasses.dataclass(frozen=True)
class DiTBlockConfig:
    """What a block needs of its :class:`DiT` (hashable: linen module fields)."""

    n_heads: int
    d_mlp: int
    mlp: str
    n_experts: int
    top_k: int
    d_expert: int
    d_shared: int
    balance_coef: float


class DiTBlock(nn.Module):
    """One adaLN-Zero block; ``(x, (c, mask)) -> (x, None)`` for ``nn.scan``."""

    c: DiTBlockConfig

    @nn.compact
    def __call__(self, x, c_mask):
        c, mask = c_mask
        cfg, d = self.c, x.shape[-1]
        mod = nn.Dense(6 * d, kernel_init=nn.initializers.zeros, name="modulation")(nn.silu(c))
        mod = site(self, "adaln", mod.reshape(-1, 6, d))
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i] for i in range(6))
        x = site(self, "resid_pre", x)
        h = _modulate(_layer_norm("norm1")(x), shift1, scale1)
        a, _ = Attention(cfg.n_heads, cfg.n_heads, d // cfg.n_heads, qkv_bias=True,
                         name="attn")(h, None, mask)
        x = site(self, "resid_mid", x + site(self, "attn_out", gate1[:, None] * a))
        h = _modulate(_layer_norm("norm2")(x), shift2, scale2)
        if cfg.n_experts:
            m = MoE(cfg.n_experts, cfg.top_k, cfg.d_expert, router="softmax",
                    norm_topk_prob=False, d_shared=cfg.d_shared,
                    aux_loss_coef=cfg.balance_coef, balance_loss_form="dit", name="moe")(h)
        elif cfg.mlp == "swiglu":
            m = GatedMLP(cfg.d_mlp, name="mlp")(h)
        else:
            m = MLP(cfg.d_mlp, gelu_tanh, name="mlp")(h)
        m = site(self, "mlp_out", gate2[:, None] * m)
        return site(self, "resid_post", x + m), None


def _layer(axes: str) -> tuple[str, ...]:
    return ("layer", "batch", *axes.split())


class DiT(nn.Module):
    """The DiT of the module docstring. ``mlp``: ``"gelu"`` (DiT) or ``"swiglu"`` (a dense
    baseline at DiT-MoE's active parameters: ``d_mlp = top_k d_expert + d_shared``).
    ``null_class``: one more class id, ``n_classes``, meaning "no class" (classifier-free
    guidance: labels dropped to it in training, see :func:`mechinterp.train.flow.flow_objective`)."""

    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 128
    mlp: str = "gelu"
    n_classes: int = 10
    null_class: bool = False
    cond_vocab: int = 0
    n_cond: int = 0
    n_experts: int = 0
    top_k: int = 2
    d_expert: int = 32
    d_shared: int = 32
    balance_coef: float = 0.01
    freq_dim: int = 64
    scan_layers: bool = True

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": SiteSpec(("batch", "pos", "d_model"),
                          "patch embeddings plus position embeddings (image tokens)"),
        "t_embed": SiteSpec(("batch", "d_model"), "timestep embedding"),
        "cond_embed": SiteSpec(("batch", "d_model"),
                               "adaLN conditioning c: timestep plus class embedding"),
        "cond_tokens": SiteSpec(("batch", "pos", "d_model"),
                                "conditioning-token embeddings (joint attention only)"),
        "adaln": SiteSpec(_layer("chunk d_model"), "adaLN-Zero modulation: shift1, scale1, "
                          "gate1 (attention), shift2, scale2, gate2 (MLP)"),
        **{name: spec for name, spec in Decoder.SITES.items()
           if name not in ("embed", "final_norm", "logits")},
        **{name: ViT.SITES[name] for name in ("attn.q", "attn.k", "attn.v")},
        "attn_out": SiteSpec(_layer("pos d_model"), "attention output times the adaLN gate: "
                             "what the block adds"),
        "mlp_out": SiteSpec(_layer("pos d_model"), "MLP (or MoE) output times the adaLN "
                            "gate: what the block adds"),
        **{name: MoEDecoder.SITES[name] for name in _MOE},
        "final_norm": SiteSpec(("batch", "pos", "d_model"),
                               "image tokens after the final modulated norm"),
        "output": SiteSpec(("batch", "height", "width", "channel"),
                           "the prediction (flow velocity), unpatchified"),
    }

    def __post_init__(self):
        if self.mlp not in MLPS:
            raise ValueError(f"DiT mlp={self.mlp!r} is not one of {MLPS}")
        if self.image_size % self.patch_size or self.d_model % self.n_heads:
            raise ValueError(
                f"DiT needs image_size ({self.image_size}) divisible by patch_size "
                f"({self.patch_size}) and d_model ({self.d_model}) by n_heads ({self.n_heads})")
        if (self.cond_vocab > 0) != (self.n_cond > 0):
            raise ValueError(f"joint attention needs both cond_vocab and n_cond > 0, got "
                             f"cond_vocab={self.cond_vocab}, n_cond={self.n_cond}")
        super().__post_init__()

    @property
    def block_config(self) -> DiTBlockConfig:
        return DiTBlockConfig(self.n_heads, self.d_mlp, self.mlp, self.n_experts, self.top_k,
                              self.d_expert, self.d_shared, self.balance_coef)

    @property
    def n_tokens(self) -> int:
        """Attention sequence length: conditioning tokens, then image patches."""
        return self.n_cond + (self.image_size // self.patch_size) ** 2

    def _check(self, images, t, y, cond, attn_mask):
        size = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != size:
            raise ValueError(f"DiT takes images (batch, {size[0]}, {size[1]}, {size[2]}), "
                             f"got shape {images.shape}")
        b = images.shape[0]
        if jnp.shape(t) != (b,):
            raise ValueError(f"DiT takes t (batch,) = ({b},), got shape {jnp.shape(t)}")
        if (y is None) != (self.n_classes == 0):
            raise ValueError(f"DiT with n_classes={self.n_classes} needs class ids y (batch,)"
                             if y is None else "DiT with n_classes=0 takes no class ids: "
                             "pass y=None")
        if y is not None and jnp.shape(y) != (b,):
            raise ValueError(f"DiT takes y (batch,) = ({b},), got shape {jnp.shape(y)}")
        if (cond is None) != (self.n_cond == 0) or (
                cond is not None and jnp.shape(cond) != (b, self.n_cond)):
            raise ValueError(f"DiT with n_cond={self.n_cond} takes cond of shape (batch, "
                             f"n_cond) = ({b}, {self.n_cond}) (None when n_cond=0), got "
                             f"{None if cond is None else jnp.shape(cond)}")
        n = self.n_tokens
        if attn_mask is not None and jnp.shape(attn_mask) != (b, n, n):
            raise ValueError(f"attn_mask must be (batch, query, key) = ({b}, {n}, {n}), got "
                             f"{jnp.shape(attn_mask)}")

    @nn.compact
    def __call__(self, images, t, y=None, cond=None, attn_mask=None):
        self._check(images, t, y, cond, attn_mask)
        p, d = self.patch_size, self.d_model
        x = nn.Dense(d, name="patch_embed")(patchify(jnp.asarray(images, jnp.float32), p))
        x = site(self, "embed", x + self.param("pos_embed", nn.initializers.normal(0.02),
                                               (1, *x.shape[1:])))
        temb = timestep_embedding(t, self.freq_dim)
        temb = nn.Dense(d, name="t_mlp_out")(nn.silu(nn.Dense(d, name="t_mlp_in")(temb)))
        c = site(self, "t_embed", temb)
        if self.n_classes:
            c = c + nn.Embed(self.n_classes + self.null_class, d,
                             embedding_init=nn.initializers.normal(0.02), name="class_embed")(y)
        c = site(self, "cond_embed", c)
        if self.n_cond:
            tokens = nn.Embed(self.cond_vocab, d, embedding_init=nn.initializers.normal(0.02),
                              name="cond_token_embed")(cond)
            tokens = site(self, "cond_tokens", tokens + self.param(
                "cond_pos", nn.initializers.normal(0.02), (1, self.n_cond, d)))
            x = jnp.concatenate([tokens, x], axis=1)
        n = x.shape[1]
        mask = (jnp.ones((x.shape[0], n, n), bool) if attn_mask is None
                else jnp.asarray(attn_mask, bool))
        if self.scan_layers:
            stack = nn.scan(DiTBlock, variable_axes={"params": 0, INTERMEDIATES: 0,
                                                     INTERVENTIONS: 0, AUX_LOSS: 0},
                            split_rngs={"params": True}, in_axes=nn.broadcast,
                            length=self.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(self.block_config, name="layers")(x, (c, mask))
        else:
            for i in range(self.n_layers):
                x, _ = DiTBlock(self.block_config, name=f"layers_{i}")(x, (c, mask))
        x = x[:, self.n_cond:]
        shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros,
                                          name="final_modulation")(nn.silu(c)), 2, axis=-1)
        x = site(self, "final_norm", _modulate(_layer_norm("norm")(x), shift, scale))
        out = nn.Dense(p * p * self.channels, kernel_init=nn.initializers.zeros,
                       name="final_proj")(x)
        return site(self, "output", unpatchify(out, p, self.image_size, self.image_size,
                                               self.channels))

    def layer_structure(self) -> LayerStructure:  # HasLayers
        return LayerStructure(
            n_layers=self.n_layers, residual=("resid_pre", "resid_mid", "resid_post"),
            sublayers={"attn": SublayerSites("resid_pre", "attn_out", "resid_mid"),
                       "mlp": SublayerSites("resid_mid", "mlp_out", "resid_post")})

    def active_mlp_params(self) -> int:
        """Weights one token uses in one block's MLP (router included, biases excluded)."""
        d = self.d_model
        if self.n_experts:
            return 3 * d * (self.top_k * self.d_expert + self.d_shared) + d * self.n_experts
        return (3 if self.mlp == "swiglu" else 2) * d * self.d_mlp

