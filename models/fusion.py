"""Multi-view classifiers: five ways to fuse several time-series views (Mena et al., 2024).

Each class takes the views as positional inputs, ``view_v (batch, time, channel_v)``, one
temporal encoder kind (:func:`~mechinterp.models.temporal.make_encoder`) and returns class
logits. ``InputFusion``: views concatenated along channels, one encoder. ``FeatureFusion``:
one encoder per view, features concatenated, one head. ``DecisionFusion``: one encoder and
head per view, trained jointly through the averaged prediction
``log mean_v softmax(logits_v)``. ``EnsembleFusion``: the same network, each view's model
trained on its own loss (the sum of disjoint per-view losses is independent training), the
same averaged prediction. ``HybridFusion``: feature fusion plus per-view auxiliary heads
(loss: fused + mean auxiliary), predicting the average over all heads. ``heads=True``
returns ``(head logits (head, batch, class), loss weights)``: the training objective is
``sum_h w_h CE(head_h)``. Per-view encoders are modules ``views_0, views_1, ...``, so an
encoder site carries a leading ``view`` axis; ``FUSIONS`` maps names to classes.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.sites import SiteSpec, site

from .temporal import Recurrent, TempCNN, TemporalAttention, make_encoder

_ENCODER_SITES = {**Recurrent.SITES, **TempCNN.SITES, **TemporalAttention.SITES}
_LOGITS = SiteSpec(("batch", "class"), "the prediction's logits (log-probabilities when "
                                       "heads are averaged)")


def _per_view(specs: dict[str, SiteSpec]) -> dict[str, SiteSpec]:
    return {k: SiteSpec(("view",) + s.axes, f"{s.meaning}, per view") for k, s in specs.items()}


def _check_views(owner: str, views) -> None:
    if not views:
        raise ValueError(f"{owner} needs at least one view (batch, time, channel)")
    bad = [i for i, v in enumerate(views) if v.ndim != 3]
    if bad:
        raise ValueError(f"{owner}: views {bad} are not (batch, time, channel); got shapes "
                         f"{[v.shape for v in views]}")
    if len({v.shape[:2] for v in views}) != 1:
        raise ValueError(f"{owner}: views must share batch and time axes, got shapes "
                         f"{[v.shape for v in views]}; resample them to one time grid")


def log_mean_prob(logits):
    """``log mean_h softmax(logits[h])`` over the leading head axis."""
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=0) - np.log(logits.shape[0])


class _Branch(nn.Module):
    """One view's encoder and (if ``n_classes``) its own head."""

    encoder: str
    width: int
    n_heads: int
    n_classes: int = 0

    @nn.compact
    def __call__(self, x):
        features = make_encoder(self.encoder, self.width, self.n_heads, name="encoder")(x)
        if not self.n_classes:
            return features, None
        return features, site(self, "view_logits", nn.Dense(self.n_classes, name="head")(features))


class _Fusion(nn.Module):
    encoder: str = "ltae"
    n_classes: int = 2
    width: int = 32
    n_heads: int = 4

    def branches(self, views, heads: bool):
        _check_views(type(self).__name__, views)
        out = [_Branch(self.encoder, self.width, self.n_heads, self.n_classes if heads else 0,
                       name=f"views_{i}")(v) for i, v in enumerate(views)]
        features = [f for f, _ in out]
        return features, (jnp.stack([l for _, l in out]) if heads else None)

    def fused_head(self, features):
        fused = site(self, "fused", jnp.concatenate(features, -1))
        return nn.Dense(self.n_classes, name="head")(fused)


class InputFusion(_Fusion):
    SITES: ClassVar[dict[str, SiteSpec]] = {**_ENCODER_SITES, "logits": _LOGITS}

    @nn.compact
    def __call__(self, *views, heads: bool = False):
        _check_views("InputFusion", views)
        x = jnp.concatenate(views, -1)
        features = make_encoder(self.encoder, self.width, self.n_heads, name="encoder")(x)
        logits = site(self, "logits", nn.Dense(self.n_classes, name="head")(features))
        return (logits[None], (1.0,)) if heads else logits


class FeatureFusion(_Fusion):
    SITES: ClassVar[dict[str, SiteSpec]] = {
        **_per_view(_ENCODER_SITES),
        "fused": SiteSpec(("batch", "hidden"), "the views' features, concatenated"),
        "logits": _LOGITS}

    @nn.compact
    def __call__(self, *views, heads: bool = False):
        features, _ = self.branches(views, heads=False)
        logits = site(self, "logits", self.fused_head(features))
        return (logits[None], (1.0,)) if heads else logits


_VIEW_LOGITS = SiteSpec(("view", "batch", "class"), "each view's own head")


class DecisionFusion(_Fusion):
    SITES: ClassVar[dict[str, SiteSpec]] = {
        **_per_view(_ENCODER_SITES), "view_logits": _VIEW_LOGITS, "logits": _LOGITS}

    @nn.compact
    def __call__(self, *views, heads: bool = False):
        _, view_logits = self.branches(views, heads=True)
        logits = site(self, "logits", log_mean_prob(view_logits))
        return (logits[None], (1.0,)) if heads else logits


class EnsembleFusion(DecisionFusion):
    @nn.compact
    def __call__(self, *views, heads: bool = False):
        _, view_logits = self.branches(views, heads=True)
        logits = site(self, "logits", log_mean_prob(view_logits))
        return (view_logits, (1.0,) * len(views)) if heads else logits


class HybridFusion(_Fusion):
    SITES: ClassVar[dict[str, SiteSpec]] = {
        **FeatureFusion.SITES, "view_logits": _VIEW_LOGITS,
        "fused_logits": SiteSpec(("batch", "class"), "the fused features' head")}

    @nn.compact
    def __call__(self, *views, heads: bool = False):
        features, view_logits = self.branches(views, heads=True)
        fused = site(self, "fused_logits", self.fused_head(features))
        every = jnp.concatenate([fused[None], view_logits])
        logits = site(self, "logits", log_mean_prob(every))
        weights = (1.0,) + (1.0 / len(views),) * len(views)
        return (every, weights) if heads else logits


FUSIONS = {"input": InputFusion, "feature": FeatureFusion, "decision": DecisionFusion,
           "ensemble": EnsembleFusion, "hybrid": HybridFusion}


def make_fusion(fusion: str, encoder: str, n_classes: int, width: int = 32, n_heads: int = 4
                ) -> _Fusion:
    """The classifier fusing views at level ``fusion`` (a key of :data:`FUSIONS`)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {list(FUSIONS)}")
    return FUSIONS[fusion](encoder=encoder, n_classes=n_classes, width=width, n_heads=n_heads)
