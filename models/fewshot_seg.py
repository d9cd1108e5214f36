"""Few-shot segmentation: a support-conditioned teacher and support-free students.

All three share :class:`Encoder` (a stem convolution, average pooling by ``pool`` and the
residual blocks of :class:`mechinterp.models.cnn.ResidualBlock` without BatchNorm).
:class:`FSSTeacher` ``(query, support, support_mask) -> logits`` compares query features
with the supports' masked-average prototypes (PANet) and with every support pixel (dense
correlation, max over pixels) and decodes the four similarity maps with a small
class-agnostic CNN. :class:`FSSStudent` ``(images) -> logits`` (DistillFSS) replaces the
supports by a dedicated per-class layer (learned fg/bg prototypes and ``n_keys`` fg/bg key
vectors) in front of the same decoder; :func:`student_from_support` initialises it from the
shots. :class:`LinearSegmenter`: the encoder and a 1x1 convolution (the fine-tuning
baseline). Logits are per pixel (foreground), bilinearly upsampled. Sites: ``SITES``.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .cnn import ResidualBlock

_MAP = ("batch", "height", "width", "channel")
ENCODER_SITES = {
    "stem": SiteSpec(_MAP, "stem convolution, average-pooled (queries, then supports)"),
    "resid_pre": SiteSpec(("layer",) + _MAP, "residual stream entering the block"),
    "conv.pre": SiteSpec(("layer",) + _MAP, "first convolution's output"),
    "conv.hidden": SiteSpec(("layer",) + _MAP, "ReLU(conv.pre)"),
    "conv_out": SiteSpec(("layer",) + _MAP, "second convolution: the block's write"),
    "resid_post": SiteSpec(("layer",) + _MAP, "residual stream leaving the block"),
    "features": SiteSpec(_MAP, "encoder output: the features every head compares"),
}
HEAD_SITES = {
    "similarity": SiteSpec(_MAP, "cosine to fg, bg prototype; max cosine to fg, bg pixels/keys"),
    "decoder.hidden": SiteSpec(_MAP, "ReLU(conv3x3(similarity)) in the decoder"),
    "logits": SiteSpec(("batch", "height", "width"), "foreground logit per pixel"),
}


def _unit(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def downsample_masks(masks, pool: int):
    """Masks ``(..., H, W)`` -> foreground fractions ``(..., H/pool, W/pool)``."""
    *lead, h, w = masks.shape
    m = jnp.asarray(masks, jnp.float32).reshape(*lead, h // pool, pool, w // pool, pool)
    return m.mean(axis=(-3, -1))


def _upsample(logits, size):
    return jax.image.resize(logits, logits.shape[:1] + (size, size), "bilinear")


class Encoder(nn.Module):
    """Images ``(batch, H, W, 3)`` -> features ``(batch, H/pool, W/pool, width)``."""

    width: int = 24
    n_layers: int = 2
    pool: int = 2

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[1] % self.pool or images.shape[2] % self.pool:
            raise ValueError(f"the few-shot encoder takes images (batch, height, width, "
                             f"channels) with sides divisible by pool={self.pool}; got shape "
                             f"{images.shape}")
        x = nn.Conv(self.width, (3, 3), name="stem_conv")(jnp.asarray(images, jnp.float32))
        x = site(self, "stem", nn.avg_pool(x, (self.pool,) * 2, (self.pool,) * 2))
        stack = nn.scan(ResidualBlock, variable_axes={"params": 0, INTERMEDIATES: 0,
                                                      INTERVENTIONS: 0},
                        split_rngs={"params": True}, in_axes=nn.broadcast,
                        length=self.n_layers)
        x, _ = stack(self.width, norm=False, name="layers")(x, False)
        return site(self, "features", x)


class Decoder(nn.Module):
    """Similarity maps ``(batch, h, w, 4)`` -> low-resolution logits ``(batch, h, w)``."""

    hidden: int = 16

    @nn.compact
    def __call__(self, similarity):
        h = nn.relu(nn.Conv(self.hidden, (3, 3), name="conv1")(similarity))
        h = site(self, "decoder.hidden", h)
        return nn.Conv(1, (3, 3), name="conv2")(h)[..., 0]


class _Family:
    """What the three models share: the layer structure of the encoder."""

    def layer_structure(self) -> LayerStructure:  # HasLayers
        return LayerStructure(
            n_layers=self.n_layers, residual=("resid_pre", "resid_post"),
            sublayers={"conv": SublayerSites("resid_pre", "conv_out", "resid_post")})


class FSSTeacher(_Family, nn.Module):
    """Support-conditioned segmenter: ``query (batch, H, W, 3)``, ``support (batch, shots,
    H, W, 3)``, ``support_mask (batch, shots, H, W)`` -> ``logits (batch, H, W)``. Encoder
    sites hold the queries, then the supports (``batch * (1 + shots)`` rows)."""

    width: int = 24
    n_layers: int = 2
    pool: int = 2
    hidden: int = 16

    SITES: ClassVar[dict[str, SiteSpec]] = {
        **ENCODER_SITES,
        "prototypes": SiteSpec(("batch", "fg_bg", "channel"),
                               "masked average of support features (fg, bg)"),
        **HEAD_SITES}

    @nn.compact
    def __call__(self, query, support, support_mask):
        b, k = support.shape[:2]
        if support.shape[2:] != query.shape[1:] or support_mask.shape != support.shape[:4]:
            raise ValueError(f"support (batch, shots, H, W, C) {support.shape} and support_mask "
                             f"(batch, shots, H, W) {support_mask.shape} must match query "
                             f"{query.shape}")
        encoder = Encoder(self.width, self.n_layers, self.pool, name="encoder")
        feats = encoder(jnp.concatenate([query, support.reshape(-1, *support.shape[2:])]))
        fq, fs = _unit(feats[:b]), feats[b:].reshape(b, k, *feats.shape[1:])
        m = downsample_masks(support_mask, self.pool)[..., None]
        fg = (fs * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) + 1e-6)
        bg = (fs * (1 - m)).sum((1, 2, 3)) / ((1 - m).sum((1, 2, 3)) + 1e-6)
        protos = site(self, "prototypes", jnp.stack([fg, bg], 1))
        cos = jnp.einsum("bhwd,bnd->bhwn", fq, _unit(fs).reshape(b, -1, fs.shape[-1]))
        m = m.reshape(b, 1, 1, -1)
        corr = [jnp.where(m >= 0.5, cos, -1.0).max(-1), jnp.where(m < 0.5, cos, -1.0).max(-1)]
        sim = jnp.concatenate([jnp.einsum("bhwd,bpd->bhwp", fq, _unit(protos)),
                               jnp.stack(corr, -1)], -1)
        logits = Decoder(self.hidden, name="decoder")(site(self, "similarity", sim))
        return site(self, "logits", _upsample(logits, query.shape[1]))


class ClassLayer(nn.Module):
    """The student's dedicated layer: fg/bg prototypes and ``n_keys`` fg/bg keys in place
    of the support features; features -> the four similarity maps the teacher computes."""

    n_keys: int = 16

    @nn.compact
    def __call__(self, features):
        d = features.shape[-1]
        protos = self.param("prototypes", nn.initializers.normal(1.0), (2, d))
        keys = self.param("keys", nn.initializers.normal(1.0), (2, self.n_keys, d))
        f = _unit(features)
        corr = jnp.einsum("bhwd,cnd->bhwcn", f, _unit(keys)).max(-1)
        return jnp.concatenate([jnp.einsum("bhwd,cd->bhwc", f, _unit(protos)), corr], -1)


class FSSStudent(_Family, nn.Module):
    """DistillFSS student: ``images (batch, H, W, 3) -> logits (batch, H, W)``; no support
    argument (the class lives in ``class_layer``'s parameters). ``method="from_features"``
    runs the head alone on encoder features (training with a frozen encoder)."""

    width: int = 24
    n_layers: int = 2
    pool: int = 2
    hidden: int = 16
    n_keys: int = 16

    SITES: ClassVar[dict[str, SiteSpec]] = {**ENCODER_SITES, **HEAD_SITES}

    def setup(self):
        self.encoder = Encoder(self.width, self.n_layers, self.pool)
        self.class_layer = ClassLayer(self.n_keys)
        self.decoder = Decoder(self.hidden)

    def __call__(self, images):
        return self.from_features(self.encoder(images))

    def from_features(self, features):
        logits = self.decoder(site(self, "similarity", self.class_layer(features)))
        return site(self, "logits", _upsample(logits, features.shape[1] * self.pool))


class LinearSegmenter(_Family, nn.Module):
    """The encoder and a 1x1 convolution: ``images -> logits (batch, H, W)``;
    ``method="from_features"`` as in :class:`FSSStudent`."""

    width: int = 24
    n_layers: int = 2
    pool: int = 2

    SITES: ClassVar[dict[str, SiteSpec]] = {**ENCODER_SITES, "logits": HEAD_SITES["logits"]}

    def setup(self):
        self.encoder = Encoder(self.width, self.n_layers, self.pool)
        self.head = nn.Conv(1, (1, 1))

    def __call__(self, images):
        return self.from_features(self.encoder(images))

    def from_features(self, features):
        logits = self.head(features)[..., 0]
        return site(self, "logits", _upsample(logits, features.shape[1] * self.pool))


def student_from_support(teacher: FSSTeacher, params: dict, support, support_mask, *,
                         n_keys: int = 16, seed: int = 0) -> tuple[FSSStudent, dict]:
    """A student for the class shown by ``support (shots, H, W, 3)`` / ``support_mask
    (shots, H, W)``: the teacher's encoder and decoder, prototypes = the shots' masked
    feature averages, keys = ``n_keys`` random fg (bg) support pixel features."""
    student = FSSStudent(teacher.width, teacher.n_layers, teacher.pool, teacher.hidden, n_keys)
    feats = np.asarray(encode(teacher, params, support))
    feats = feats.reshape(-1, feats.shape[-1])
    m = np.asarray(downsample_masks(support_mask, teacher.pool)).reshape(-1, 1)
    if not (m >= 0.5).any():
        raise ValueError("support_mask has no foreground cell at the encoder's resolution "
                         f"(pool={teacher.pool}); give shots whose objects are visible")
    rng = np.random.default_rng(seed)
    protos = np.stack([(feats * m).sum(0) / m.sum(), (feats * (1 - m)).sum(0) / (1 - m).sum()])
    keys = np.stack([feats[rng.choice(np.flatnonzero(sel), n_keys)]
                     for sel in (m[:, 0] >= 0.5, m[:, 0] < 0.5)])
    class_layer = {"prototypes": jnp.asarray(protos), "keys": jnp.asarray(keys)}
    return student, {"encoder": params["encoder"], "class_layer": class_layer,
                     "decoder": params["decoder"]}


def encode(model, params: dict, images):
    """The encoder features of ``images`` under ``params["encoder"]`` (any of the three
    models: they share the encoder)."""
    encoder = Encoder(model.width, model.n_layers, model.pool)
    return encoder.apply({"params": params["encoder"]}, images)
