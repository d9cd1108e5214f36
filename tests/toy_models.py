"""Tiny models that use sites, for testing the core alone: a residual MLP (scanned or
unrolled) with no capabilities, and ToyFamily, the smallest family that speaks the family
protocol."""

import flax.linen as nn
import jax.numpy as jnp

from mechinterp.family import LayerStructure, SublayerSites
from mechinterp.sites import SiteSpec, site


class ToyBlock(nn.Module):
    """A residual tanh MLP. ``hidden`` names the neuron site; ``out``, when given, names a
    site on the MLP's output (ToyFamily's layer structure needs one, ToyModel has none)."""

    width: int
    hidden: str = "hidden"
    out: str | None = None

    @nn.compact
    def __call__(self, x, _=None):
        x = site(self, "resid_pre", x)
        hidden = site(self, self.hidden, jnp.tanh(nn.Dense(self.width, name="up")(x)))
        out = nn.Dense(x.shape[-1], name="down")(hidden)
        x = x + (site(self, self.out, out) if self.out else out)
        return site(self, "resid_post", x), None


class ToyModel(nn.Module):
    """x (batch, d_in) -> logits (batch, n_out) through ``n_layers`` residual MLP blocks."""

    d_model: int = 8
    width: int = 16
    n_layers: int = 3
    n_out: int = 5
    scan_layers: bool = True

    SITES = {
        "embed": SiteSpec(("batch", "d_model"), "input projection"),
        "resid_pre": SiteSpec(("layer", "batch", "d_model"), "block input"),
        "hidden": SiteSpec(("layer", "batch", "neuron"), "MLP neurons"),
        "resid_post": SiteSpec(("layer", "batch", "d_model"), "block output"),
        "aux": SiteSpec(("batch", "n_out"), "only reached with use_aux=True"),
        "logits": SiteSpec(("batch", "n_out"), "outputs"),
    }

    @nn.compact
    def __call__(self, x, use_aux: bool = False):
        x = site(self, "embed", nn.Dense(self.d_model, name="proj_in")(x))
        if self.scan_layers:
            stack = nn.scan(
                ToyBlock,
                variable_axes={"params": 0, "intermediates": 0, "interventions": 0},
                split_rngs={"params": True},
                length=self.n_layers,
            )
            x, _ = stack(self.width, name="layers")(x, None)
        else:
            for i in range(self.n_layers):
                x, _ = ToyBlock(self.width, name=f"layers_{i}")(x)
        logits = site(self, "logits", nn.Dense(self.n_out, name="head")(x))
        if use_aux:
            logits = site(self, "aux", logits * 2.0)
        return logits


def unstack(params, n_layers):
    """Scanned params -> unrolled params (layers -> layers_0, layers_1, ...)."""
    import jax

    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    return out


# ---------------------------------------------------------------------------------------
# The smallest family that speaks the family protocol (docs/adding_a_family.md): a token
# model whose layers are residual MLPs, with the layer structure and output selection
# capabilities and none of the others.


class ToyFamily(nn.Module):
    """tokens (batch, pos) -> logits (batch, pos, vocab) through ``n_layers`` residual MLPs
    (each position on its own). Capabilities: ``HasLayers``, ``SelectsOutputs``."""

    vocab: int = 11
    d_model: int = 8
    width: int = 16
    n_layers: int = 2

    SITES = {
        "embed": SiteSpec(("batch", "pos", "d_model"), "token embeddings"),
        "resid_pre": SiteSpec(("layer", "batch", "pos", "d_model"), "block input"),
        "mlp.hidden": SiteSpec(("layer", "batch", "pos", "neuron"), "MLP neurons"),
        "mlp_out": SiteSpec(("layer", "batch", "pos", "d_model"), "MLP output"),
        "resid_post": SiteSpec(("layer", "batch", "pos", "d_model"), "block output"),
        "logits": SiteSpec(("batch", "pos", "vocab"), "next-token logits"),
    }
    selectable_outputs = frozenset({"positions"})

    @nn.compact
    def __call__(self, tokens, logit_positions=None):
        x = site(self, "embed", nn.Embed(self.vocab, self.d_model, name="token_embed")(tokens))
        stack = nn.scan(ToyBlock, variable_axes={"params": 0, "intermediates": 0,
                                                 "interventions": 0},
                        split_rngs={"params": True}, length=self.n_layers)
        x, _ = stack(self.width, "mlp.hidden", "mlp_out", name="layers")(x, None)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
        return site(self, "logits", nn.Dense(self.vocab, name="unembed")(x))

    def layer_structure(self) -> LayerStructure:
        return LayerStructure(n_layers=self.n_layers, residual=("resid_pre", "resid_post"),
                              sublayers={"mlp": SublayerSites("resid_pre", "mlp_out",
                                                              "resid_post")})

    def output_selection(self, positions, columns=None):
        return {"logit_positions": positions}
