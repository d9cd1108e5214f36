"""A table transformer in the manner of TARTE (Kim et al., 2025): a row is a set of
(column-name embedding, cell) pairs plus a readout token.

``names (batch, col, d_name)`` (a fixed embedding of each column's name string),
``values (batch, col)`` (standardized numbers) and ``mask (batch, col)`` (False: padding or
a dropped cell) -> token ``j = W_n name_j + value_j * (W_v name_j)`` (the value scales a
name-dependent direction, as CARTE/TARTE embed numbers) -> a learned readout token at
position 0 -> ``n_layers`` pre-norm blocks ``x + attn(norm(x))``, ``x + mlp(norm(x))``
without position embeddings (a row is a set; attention sees only unmasked cells) -> final
norm -> the readout token's state, the row's representation. Sites: ``TableTransformer.SITES``.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .decoder import Decoder
from .layers import MLP, Attention

_SHARED = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z",
           "attn_out", "resid_mid", "mlp.hidden", "mlp_out", "resid_post", "final_norm")


class TableBlock(nn.Module):
    """One pre-norm encoder block; ``(x, mask) -> (x, None)`` for ``nn.scan``."""

    n_heads: int
    d_mlp: int

    @nn.compact
    def __call__(self, x, mask):
        d_model = x.shape[-1]
        x = site(self, "resid_pre", x)
        h = nn.LayerNorm(name="norm1")(x)
        a, _ = Attention(self.n_heads, self.n_heads, d_model // self.n_heads, qkv_bias=True,
                         name="attn")(h, None, mask)
        x = site(self, "resid_mid", x + site(self, "attn_out", a))
        m = site(self, "mlp_out", MLP(self.d_mlp, name="mlp")(nn.LayerNorm(name="norm2")(x)))
        return site(self, "resid_post", x + m), None


class TableTransformer(nn.Module):
    """The row encoder (module docstring). ``__call__(names, values, mask=None)`` returns
    the row representation (batch, d_model); ``mask=None`` keeps every cell."""

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 64

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "cell_embed": SiteSpec(("batch", "pos", "d_model"), "the (name, value) tokens; "
                               "pos 0 is the readout token, cell j is pos j + 1"),
        **{name: Decoder.SITES[name] for name in _SHARED},
        "readout": SiteSpec(("batch", "d_model"), "the readout token after the final norm: "
                                                  "the row's representation"),
    }

    @nn.compact
    def __call__(self, names, values, mask=None):
        if names.ndim != 3 or values.shape != names.shape[:2]:
            raise ValueError(f"TableTransformer takes names (batch, col, d_name) and values "
                             f"(batch, col), got shapes {names.shape} and {values.shape}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        b = values.shape[0]
        mask = jnp.ones(values.shape, bool) if mask is None else mask.astype(bool)
        cells = (nn.Dense(self.d_model, name="name_embed")(names)
                 + values[..., None] * nn.Dense(self.d_model, name="value_embed")(names))
        readout = self.param("readout_token", nn.initializers.normal(0.02), (self.d_model,))
        x = jnp.concatenate([jnp.broadcast_to(readout, (b, 1, self.d_model)), cells], 1)
        x = site(self, "cell_embed", x)
        keys = jnp.concatenate([jnp.ones((b, 1), bool), mask], 1)
        attend = jnp.broadcast_to(keys[:, None, :], (b, keys.shape[1], keys.shape[1]))
        stack = nn.scan(TableBlock, variable_axes={"params": 0, INTERMEDIATES: 0,
                                                   INTERVENTIONS: 0},
                        split_rngs={"params": True}, in_axes=nn.broadcast,
                        length=self.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(self.n_heads, self.d_mlp, name="layers")(x, attend)
        x = site(self, "final_norm", nn.LayerNorm(name="norm")(x))
        return site(self, "readout", x[:, 0])

    def layer_structure(self) -> LayerStructure:  # HasLayers
        return LayerStructure(
            n_layers=self.n_layers, residual=("resid_pre", "resid_mid", "resid_post"),
            sublayers={"attn": SublayerSites("resid_pre", "attn_out", "resid_mid"),
                       "mlp": SublayerSites("resid_mid", "mlp_out", "resid_post")})
