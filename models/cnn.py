"""A small pre-activation ResNet (He et al., 2016) for images, every activation a site.

``images (batch, height, width, channels)`` -> stem convolution -> ``n_layers`` residual
blocks ``x + conv(relu(bn(conv(relu(bn(x))))))`` of one width and resolution (so the
layers stack: ``nn.scan`` or unrolled, identical numbers) -> BatchNorm, ReLU, global average
pooling -> linear classifier. BatchNorm (:class:`~mechinterp.models.layers.BatchNorm`)
keeps running statistics in ``batch_stats``; ``model.apply(..., train=True,
mutable=["batch_stats"])`` trains, ``model.for_analysis(variables)`` gives the
``(model, params)`` the analysis core runs in inference mode. Sites: ``CNN.SITES``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .layers import BatchNorm, merge_batch_stats

_SPATIAL = ("batch", "height", "width", "channel")


def _norm(module, name, x, train):
    """BatchNorm (or nothing, with ``norm=False``) as a submodule of ``module``."""
    return BatchNorm(stats=module.stats, name=name)(x, train) if module.norm else x


class ResidualBlock(nn.Module):
    """One pre-activation residual block; ``(x, train) -> (x, None)`` as ``nn.scan`` needs."""

    width: int
    stats: str = "batch_stats"
    norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = site(self, "resid_pre", x)
        h = nn.relu(_norm(self, "norm1", x, train))
        h = site(self, "conv.pre", nn.Conv(self.width, (3, 3), name="conv1")(h))
        h = nn.relu(_norm(self, "norm2", h, train))
        h = site(self, "conv.hidden", h)
        out = site(self, "conv_out", nn.Conv(self.width, (3, 3), name="conv2")(h))
        return site(self, "resid_post", x + out), None


class CNN(nn.Module):
    """The ResNet classifier. ``stem_pool`` average-pools the stem output by that factor
    (1: none). ``stats`` is where BatchNorm keeps its running averages (see the module
    docstring); ``norm=False`` leaves BatchNorm out (a plain residual CNN, no
    ``batch_stats``)."""

    n_classes: int = 10
    width: int = 16
    n_layers: int = 3
    stem_pool: int = 1
    scan_layers: bool = True
    stats: str = "batch_stats"
    norm: bool = True

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "stem": SiteSpec(_SPATIAL, "stem convolution output (the residual stream at layer 0)"),
        "resid_pre": SiteSpec(("layer",) + _SPATIAL, "residual stream entering the block"),
        "conv.pre": SiteSpec(("layer",) + _SPATIAL, "first convolution's output"),
        "conv.hidden": SiteSpec(("layer",) + _SPATIAL,
                                "channel activations: ReLU(BN(conv.pre))"),
        "conv_out": SiteSpec(("layer",) + _SPATIAL, "second convolution: the block's write"),
        "resid_post": SiteSpec(("layer",) + _SPATIAL, "residual stream leaving the block"),
        "final_act": SiteSpec(_SPATIAL, "ReLU(BN(residual)) after the last block"),
        "pooled": SiteSpec(("batch", "channel"), "global average pool: the pre-logits"),
        "logits": SiteSpec(("batch", "class"), "class logits"),
    }

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.ndim != 4:
            raise ValueError(f"CNN takes images (batch, height, width, channels), got shape "
                             f"{images.shape}; add a trailing channel axis to grey images")
        x = nn.Conv(self.width, (3, 3), name="stem_conv")(jnp.asarray(images, jnp.float32))
        if self.stem_pool > 1:
            x = nn.avg_pool(x, (self.stem_pool,) * 2, (self.stem_pool,) * 2)
        x = site(self, "stem", x)
        if self.scan_layers:
            stack = nn.scan(
                ResidualBlock,
                variable_axes={"params": 0, self.stats: 0, INTERMEDIATES: 0, INTERVENTIONS: 0},
                split_rngs={"params": True}, in_axes=nn.broadcast, length=self.n_layers)
            x, _ = stack(self.width, self.stats, self.norm, name="layers")(x, train)
        else:
            for i in range(self.n_layers):
                x, _ = ResidualBlock(self.width, self.stats, self.norm,
                                     name=f"layers_{i}")(x, train)
        x = site(self, "final_act", nn.relu(_norm(self, "norm", x, train)))
        pooled = site(self, "pooled", x.mean(axis=(1, 2)))
        return site(self, "logits", nn.Dense(self.n_classes, name="head")(pooled))

    def for_analysis(self, variables: dict[str, Any]) -> tuple["CNN", dict]:
        """``(model, params)`` for the analysis core: BatchNorm in inference mode, its
        running statistics moved from ``variables['batch_stats']`` into the params."""
        if "params" not in variables:
            raise ValueError("for_analysis takes the whole variables dict {'params': ..., "
                             "'batch_stats': ...} that init/training returns")
        return self.clone(stats="params"), merge_batch_stats(variables)

    def layer_structure(self) -> LayerStructure:  # HasLayers
        return LayerStructure(
            n_layers=self.n_layers, residual=("resid_pre", "resid_post"),
            sublayers={"conv": SublayerSites("resid_pre", "conv_out", "resid_post")})
