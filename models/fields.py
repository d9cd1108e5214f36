"""2-D field representations: coordinates in [-1, 1]^2 -> (density, colour), for PVD-AL.

Three encoders share one head, so any field can be distilled into any other feature by
feature (Fang et al., PVD-AL): ``"mlp"`` (NeRF positional encoding
``gamma(p) = (p, sin(2^k pi p), cos(2^k pi p))_{k<L}`` then an MLP), ``"grid"`` (a dense
learnable grid, bilinearly interpolated) and ``"hash"`` (Instant-NGP: L levels of
resolution ``N_l = floor(N_min b^l)``, each a table of T feature vectors indexed by the
spatial hash ``(x * 1) xor (y * 2654435761) mod T``, dense where ``(N_l + 1)^2 <= T``).
Each encoding is projected to ``feature`` (width ``d_feature``), then the head
``Dense -> ReLU -> Dense`` gives ``density = softplus`` and ``colour = sigmoid``.
Call: ``Field(kind="hash")(coords (batch, 2)) -> (batch, 1 + channels)``.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mechinterp.sites import SiteSpec, site

KINDS = ("mlp", "grid", "hash")
PRIME = np.uint32(2654435761)


def positional_encoding(p, n_freqs: int):
    """``(p, sin(2^k pi p), cos(2^k pi p))`` for ``k < n_freqs``: (..., 2 + 4 n_freqs)."""
    freqs = (2.0 ** jnp.arange(n_freqs)) * jnp.pi
    angles = (p[..., None, :] * freqs[:, None]).reshape(*p.shape[:-1], -1)
    return jnp.concatenate([p, jnp.sin(angles), jnp.cos(angles)], -1)


def bilinear(table, p, resolution: int, index):
    """Features at ``p`` in [-1, 1]^2 from the ``(resolution + 1)^2`` grid vertices, read
    through ``index(ix, iy) -> row of table``: (batch, features)."""
    u = (jnp.clip(p, -1.0, 1.0) + 1.0) / 2.0 * resolution
    i0 = jnp.clip(jnp.floor(u), 0, resolution - 1).astype(jnp.uint32)
    w = u - i0
    out = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            weight = ((w[:, 0] if dx else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1]))
            out = out + weight[:, None] * table[index(i0[:, 0] + dx, i0[:, 1] + dy)]
    return out


class Field(nn.Module):
    """See the module docstring. ``channels``: colour channels; ``d_feature``: the shared
    feature width; ``width``/``depth``: the MLP encoder; ``grid_resolution``/
    ``grid_features``: the dense grid; ``levels``, ``table_size``, ``level_features``,
    ``min_resolution``, ``growth``: the hash grid."""

    kind: str = "mlp"
    channels: int = 3
    d_feature: int = 32
    head_width: int = 32
    n_freqs: int = 6
    width: int = 64
    depth: int = 3
    grid_resolution: int = 32
    grid_features: int = 8
    levels: int = 8
    table_size: int = 2 ** 10
    level_features: int = 2
    min_resolution: int = 4
    growth: float = 1.5

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "encoding": SiteSpec(("batch", "encoding"), "positional encoding (mlp), interpolated "
                             "grid features (grid) or concatenated hash levels (hash)"),
        "encoder.hidden": SiteSpec(("layer", "batch", "width"),
                                   "MLP encoder hidden units after ReLU (mlp only)"),
        "feature": SiteSpec(("batch", "d_feature"),
                            "the shared feature the head reads (distilled in stage 1)"),
        "head.hidden": SiteSpec(("batch", "head_width"), "head hidden units after ReLU"),
        "density": SiteSpec(("batch", "one"), "density, softplus (>= 0)"),
        "colour": SiteSpec(("batch", "channel"), "colour, sigmoid (in [0, 1])"),
        "values": SiteSpec(("batch", "value"), "density then colour: the output"),
    }

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Field kind={self.kind!r} is not one of {KINDS}")
        super().__post_init__()

    def resolutions(self) -> list[int]:
        """``N_l = floor(N_min * growth^l)`` of the hash levels."""
        return [int(np.floor(self.min_resolution * self.growth ** l))
                for l in range(self.levels)]

    def _encode(self, p):
        if self.kind == "mlp":
            h = positional_encoding(p, self.n_freqs)
            enc = site(self, "encoding", h)
            hidden = []
            for i in range(self.depth):
                h = nn.relu(nn.Dense(self.width, name=f"encoder_{i}")(h))
                hidden.append(h)
            site(self, "encoder.hidden", jnp.stack(hidden))
            return h
        init = nn.initializers.uniform(1e-1)
        if self.kind == "grid":
            r = self.grid_resolution
            table = self.param("grid", init, ((r + 1) ** 2, self.grid_features))
            return site(self, "encoding", bilinear(table, p, r, lambda x, y: x * (r + 1) + y))
        feats = []
        for l, r in enumerate(self.resolutions()):
            dense = (r + 1) ** 2 <= self.table_size
            size = (r + 1) ** 2 if dense else self.table_size
            table = self.param(f"hash_{l}", init, (size, self.level_features))
            index = ((lambda x, y, r=r: x * (r + 1) + y) if dense else
                     (lambda x, y: (x ^ (y * PRIME)) % np.uint32(self.table_size)))
            feats.append(bilinear(table, p, r, index))
        return site(self, "encoding", jnp.concatenate(feats, -1))

    @nn.compact
    def __call__(self, coords):
        coords = jnp.asarray(coords, jnp.float32)
        if coords.ndim != 2 or coords.shape[-1] != 2:
            raise ValueError(f"Field takes coords (batch, 2) in [-1, 1]^2, got shape "
                             f"{coords.shape}")
        h = self._encode(coords)
        feature = site(self, "feature", nn.Dense(self.d_feature, name="to_feature")(h))
        hidden = site(self, "head.hidden",
                      nn.relu(nn.Dense(self.head_width, name="head_hidden")(feature)))
        raw = nn.Dense(1 + self.channels, name="head_out")(hidden)
        density = site(self, "density", nn.softplus(raw[:, :1]))
        colour = site(self, "colour", nn.sigmoid(raw[:, 1:]))
        return site(self, "values", jnp.concatenate([density, colour], -1))
