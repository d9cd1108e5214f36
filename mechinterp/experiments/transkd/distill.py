"""TransKD's distillation modules and losses (Liu et al., 2023), on the student's sites.

:class:`Distiller` maps the student's stage maps (``s{i}.features``) and patch embeddings
(``s{i}.patch_embed``) to the teacher's channels, compared with the teacher's same sites:
``linear``, a 1x1 projection per stage (plain feature-map KD); ``csf``, Cross Selective
Fusion: deepest stage first, each projected map is fused with the deeper fused map
(nearest-upsampled) by channel attention, ``f = a x + (1 - a) up(y)`` with
``a = softmax_2(W_k relu(W gap(x + up(y))))``, then a 3x3 conv; ``pea``, Patch Embedding
Alignment, a linear map of each embedding; ``glmixer``, PEA after the Global-Local Context
Mixer ``e + w_g attn(e) + w_l conv(e) sigmoid(conv'(e))``; ``ea``, Embedding Assistant,
PEA plus an extra overlapping patch embedding (teacher's channels) of the stage's input,
``w_p pea(e) + w_a embed(input)``. Feature maps use ReviewKD's hierarchical context loss
(:func:`hcl`), embeddings MSE.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechinterp.models.layers import Attention
from mechinterp.models.segformer import SegConfig

FEATURES = (None, "linear", "csf")
EMBEDS = (None, "pea", "glmixer", "ea")
# variant -> (feature-map form, patch-embedding form)
METHODS = {"plain": (None, None), "feature": ("linear", None), "csf": ("csf", None),
           "base": ("csf", "pea"), "glmixer": ("csf", "glmixer"), "ea": ("csf", "ea")}


def mse(a, b):
    return jnp.mean(jnp.square(a - b))


def _pool(x, side):
    b, h, w, c = x.shape
    return x.reshape(b, side, h // side, side, w // side, c).mean((2, 4))


def hcl(student, teacher) -> jax.Array:
    """ReviewKD's hierarchical context loss summed over stages: MSE of the maps and of
    their average pools to 4x4, 2x2, 1x1 (those smaller than the map), weighted 1, 1/2,
    1/4, 1/8 and normalised by the weights' sum."""
    total = 0.0
    for fs, ft in zip(student, teacher):
        loss, weight, norm = mse(fs, ft), 1.0, 1.0
        for side in (4, 2, 1):
            if side < fs.shape[1]:
                weight /= 2
                loss += weight * mse(_pool(fs, side), _pool(ft, side))
                norm += weight
        total += loss / norm
    return total


class CSF(nn.Module):
    """Cross Selective Fusion of the student's stage maps (module docstring); returns one
    map per stage with ``out_dims`` channels, shallowest first."""

    out_dims: tuple[int, ...]
    mid: int
    squeeze: int = 16

    @nn.compact
    def __call__(self, feats):
        outs, fused = [None] * len(feats), None
        for i in reversed(range(len(feats))):
            x = nn.Dense(self.mid, use_bias=False, name=f"in_s{i + 1}")(feats[i])
            if fused is not None:
                r = x.shape[1] // fused.shape[1]
                y = jnp.repeat(jnp.repeat(fused, r, 1), r, 2)
                z = nn.relu(nn.Dense(self.squeeze, name=f"squeeze_s{i + 1}")((x + y).mean((1, 2))))
                logits = jnp.stack([nn.Dense(self.mid, name=f"select_s{i + 1}{k}")(z)
                                    for k in "ab"], 1)
                a = jax.nn.softmax(logits, axis=1)[:, :, None, None, :]
                x = a[:, 0] * x + a[:, 1] * y
            outs[i] = nn.Conv(self.out_dims[i], (3, 3), padding="SAME", use_bias=False,
                              name=f"out_s{i + 1}")(x)
            fused = x
        return outs


class GLMixer(nn.Module):
    """Global-Local Context Mixer of one embedding map (batch, h, w, c): the shared
    attention block over all positions (global) and a gated 3x3 conv (local)."""

    n_heads: int

    @nn.compact
    def __call__(self, e):
        b, h, w, c = e.shape
        tokens = e.reshape(b, h * w, c)
        glob, _ = Attention(self.n_heads, self.n_heads, c // self.n_heads, qkv_bias=True,
                            name="global")(tokens, None, jnp.ones((b, h * w, h * w), bool))
        local = nn.Conv(c, (3, 3), padding="SAME", name="local")(e) * nn.sigmoid(
            nn.Conv(c, (3, 3), padding="SAME", name="local_gate")(e))
        wg, wl = (self.param(n, nn.initializers.constant(0.5), ()) for n in ("w_global",
                                                                          "w_local"))
        return e + wg * glob.reshape(b, h, w, c) + wl * local


class Distiller(nn.Module):
    """Maps the student's stage maps and embeddings to the teacher's channels:
    ``(images, feats, embeds) -> (aligned feats, aligned embeds)`` (empty lists for a form
    that is ``None``)."""

    student: SegConfig
    teacher: SegConfig
    features: str | None = None
    embeds: str | None = None
    mid: int = 32

    @nn.compact
    def __call__(self, images, feats, embeds):
        if self.features not in FEATURES or self.embeds not in EMBEDS:
            raise ValueError(f"features must be one of {FEATURES} and embeds one of "
                             f"{EMBEDS}; got {self.features!r}, {self.embeds!r}")
        dims = self.teacher.dims
        out_f, out_e = [], []
        if self.features == "linear":
            out_f = [nn.Dense(d, name=f"feat_s{i}")(f)
                     for i, (f, d) in enumerate(zip(feats, dims), 1)]
        elif self.features == "csf":
            out_f = CSF(dims, self.mid, name="csf")(feats)
        if self.embeds is None:
            return out_f, out_e
        inputs = [images, *feats[:-1]]
        n = len(dims)
        for i, (e, d) in enumerate(zip(embeds, dims), 1):
            if self.embeds == "glmixer":
                e = GLMixer(self.student.heads[i - 1], name=f"glmixer_s{i}")(e)
            aligned = nn.Dense(d, name=f"pea_s{i}")(e)
            if self.embeds == "ea":
                s = self.student.strides[i - 1]
                k = 2 * s - 1
                extra = nn.Conv(d, (k, k), strides=(s, s), padding=k // 2,
                                name=f"ea_s{i}")(inputs[i - 1])
                extra = nn.LayerNorm(name=f"ea_norm_s{i}")(extra)
                wp = self.param(f"w_pea_s{i}", nn.initializers.constant(0.1 * i), ())
                wa = self.param(f"w_ea_s{i}", nn.initializers.constant(0.1 * (i + n)), ())
                aligned = wp * aligned + wa * extra
            out_e.append(aligned)
        return out_f, out_e
