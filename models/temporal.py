"""Temporal encoders for satellite time series: LSTM, GRU, TempCNN, TAE and L-TAE.

Each maps ``x (batch, time, channel)`` to ``features (batch, width)``; every activation is
a site (``SITES`` of each class, docs/sites.md). The recurrent ones are flax's cells under
``nn.RNN`` (last hidden state). TempCNN (Pelletier et al., 2019): 1-D convolutions over
time, flattened, then a dense layer. TAE (Garnot et al., 2020): one master query per head
from the temporal mean, ``a_h = softmax(q_h . k_t / sqrt(d_k))``, ``o_h = sum_t a_h[t] e_t``
(whole embedding). L-TAE (Garnot & Landrieu, 2020): the master query ``q_h`` is a learned
parameter and the values are split by head, ``o_h = sum_t a_h[t] e_t[h-th slice]``.
Simplified here: no BatchNorm or dropout, attention over every time step (a missing
observation is an input channel, not a mask). ``make_encoder(kind, ...)`` builds one by name.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

_SEQ = ("batch", "time", "hidden")
_FEATURES = SiteSpec(("batch", "hidden"), "the encoder's output: one vector per series")
_EMBED = SiteSpec(_SEQ, "input projection (TAE/L-TAE: LayerNorm'd, plus positional encoding)")


def positional_encoding(length: int, width: int, period: float = 1000.0) -> np.ndarray:
    """Sinusoidal encoding of time steps 0..length-1 (Vaswani et al.; TAE's, with
    ``period`` 1000): ``sin(t / period^(2i/width))``, ``cos(...)`` interleaved."""
    t = np.arange(length)[:, None]
    angles = t / period ** (2 * (np.arange(width) // 2) / width)
    return np.where(np.arange(width) % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)


class Recurrent(nn.Module):
    """An LSTM (``cell="lstm"``, ``nn.OptimizedLSTMCell``) or GRU (``nn.GRUCell``)."""

    cell: str = "lstm"
    width: int = 32

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "rnn.hidden": SiteSpec(_SEQ, "hidden state after each time step"),
        "features": _FEATURES,
    }

    @nn.compact
    def __call__(self, x):
        cells = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}
        if self.cell not in cells:
            raise ValueError(f"unknown recurrent cell {self.cell!r}; choose one of {sorted(cells)}")
        hidden = site(self, "rnn.hidden", nn.RNN(cells[self.cell](self.width, name="cell"))(x))
        return site(self, "features", hidden[:, -1])


class _ConvLayer(nn.Module):
    width: int
    kernel: int

    @nn.compact
    def __call__(self, h, _=None):
        h = nn.relu(nn.Conv(self.width, (self.kernel,), padding="SAME", name="conv")(h))
        return site(self, "conv.hidden", h), None


class TempCNN(nn.Module):
    """Pointwise input projection, ``n_layers`` convolutions (ReLU) over time (scanned),
    flatten, dense + ReLU."""

    width: int = 32
    n_layers: int = 3
    kernel: int = 5

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": _EMBED,
        "conv.hidden": SiteSpec(("layer",) + _SEQ, "ReLU(conv) of each layer"),
        "features": _FEATURES,
    }

    @nn.compact
    def __call__(self, x):
        h = site(self, "embed", nn.Dense(self.width, name="proj")(x))
        stack = nn.scan(_ConvLayer, variable_axes={"params": 0, INTERMEDIATES: 0,
                                                   INTERVENTIONS: 0},
                        split_rngs={"params": True}, length=self.n_layers)
        h, _ = stack(self.width, self.kernel, name="layers")(h, None)
        flat = h.reshape(h.shape[0], -1)
        return site(self, "features", nn.relu(nn.Dense(self.width, name="dense")(flat)))


class TemporalAttention(nn.Module):
    """TAE (``lightweight=False``) or L-TAE (``lightweight=True``); see the module
    docstring. ``width`` must divide by ``n_heads``."""

    width: int = 32
    n_heads: int = 4
    d_key: int = 8
    lightweight: bool = True

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": _EMBED,
        "attn.pattern": SiteSpec(("batch", "head", "time"), "master query's attention"),
        "attn.z": SiteSpec(("batch", "head", "value"),
                           "each head's output: TAE the whole embedding, L-TAE its slice"),
        "features": _FEATURES,
    }

    @nn.compact
    def __call__(self, x):
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} must be divisible by n_heads {self.n_heads}")
        batch, time = x.shape[:2]
        e = nn.LayerNorm(name="norm")(nn.Dense(self.width, name="proj")(x))
        e = site(self, "embed", e + positional_encoding(time, self.width))
        keys = nn.DenseGeneral((self.n_heads, self.d_key), name="key")(e)  # (b, t, h, k)
        if self.lightweight:
            query = self.param("query", nn.initializers.normal(1.0), (self.n_heads, self.d_key))
            query = jnp.broadcast_to(query, (batch, self.n_heads, self.d_key))
        else:
            query = nn.DenseGeneral((self.n_heads, self.d_key), name="query")(e.mean(1))
        scores = jnp.einsum("bhk,bthk->bht", query, keys) / np.sqrt(self.d_key)
        pattern = site(self, "attn.pattern", nn.softmax(scores, axis=-1))
        if self.lightweight:
            values = e.reshape(batch, time, self.n_heads, self.width // self.n_heads)
            z = jnp.einsum("bht,bthd->bhd", pattern, values)
        else:
            z = jnp.einsum("bht,btd->bhd", pattern, e)
        z = site(self, "attn.z", z)
        return site(self, "features",
                    nn.relu(nn.Dense(self.width, name="out")(z.reshape(batch, -1))))


ENCODERS = ("lstm", "gru", "tempcnn", "tae", "ltae")


def make_encoder(kind: str, width: int, n_heads: int = 4, name: str | None = None
                 ) -> nn.Module:
    """The encoder ``kind`` (one of :data:`ENCODERS`) with ``width`` output features."""
    if kind in ("lstm", "gru"):
        return Recurrent(kind, width, name=name)
    if kind == "tempcnn":
        return TempCNN(width, name=name)
    if kind in ("tae", "ltae"):
        return TemporalAttention(width, n_heads, lightweight=kind == "ltae", name=name)
    raise ValueError(f"unknown temporal encoder {kind!r}; choose one of {list(ENCODERS)}")
