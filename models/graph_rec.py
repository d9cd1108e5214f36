"""Graph recommenders: MF-BPR, LightGCN (He et al., 2020) and MAGNET (form inferred).

Message passing is ``jax.ops.segment_sum`` over an edge list (:class:`Edges`):
``x'_r = sum_{(s, r)} w_sr x_s`` with ``w = 1 / sqrt(deg_s deg_r)``, i.e. ``x' = D^-1/2 A
D^-1/2 x``; LightGCN's output is the mean of the layer-0..K embeddings. MAGNET (inferred
from the abstract; METHODS.md item 16) adds a content-induced item-item graph propagated in
parallel (dual view, fused by a sum), item modality projections (visual, text) and
role experts: ``dominant_b/v/t`` (one modality each), ``balanced`` (their mean) and
``complementary`` (what content adds to behaviour, ``[h_v - h_b, h_t - h_b]``), mixed by a
softmax router on the behavioural embedding; users also read their items' mixture in one
more propagation hop. Experts start at zero and the content view at weight 0, so an
untrained MAGNET scores exactly as LightGCN with the same embeddings. Scores are dot products. Every activation is a site (``SITES``).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mechinterp.family import LayerStructure
from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

ROLES = ("dominant_b", "dominant_v", "dominant_t", "balanced", "complementary")


@flax.struct.dataclass
class Edges:
    """A weighted directed edge list: messages flow ``senders -> receivers``."""

    senders: jax.Array
    receivers: jax.Array
    weights: jax.Array


@flax.struct.dataclass
class RecGraph:
    """A recommender's inputs: the user-item graph over ``n_users + n_items`` nodes (users
    first), the content item-item graph, and item content in two modalities."""

    user_item: Edges
    item_item: Edges
    visual: jax.Array
    text: jax.Array


def propagate(x, edges: Edges, n_nodes: int):
    """One normalized message-passing hop: ``x'_r = sum_(s -> r) w_sr x_s``."""
    messages = x[edges.senders] * edges.weights[:, None]
    return jax.ops.segment_sum(messages, edges.receivers, num_segments=n_nodes)


class Propagation(nn.Module):
    """One parameter-free hop as a scanned layer (``(x, edges) -> (x', x')``: carry and
    per-layer output); ``prefix`` names its sites."""

    n_nodes: int
    prefix: str = ""

    @nn.compact
    def __call__(self, x, edges):
        x = site(self, f"{self.prefix}resid_pre", x)
        x = site(self, f"{self.prefix}resid_post", propagate(x, edges, self.n_nodes))
        return x, x


def _stack(n_nodes: int, n_layers: int, prefix: str, name: str):
    return nn.scan(Propagation, variable_axes={INTERMEDIATES: 0, INTERVENTIONS: 0},
                   in_axes=nn.broadcast, length=n_layers)(n_nodes, prefix, name=name)


def layer_mean(stack, x, edges, n_layers: int):
    """LightGCN's layer combination: the mean of ``x`` and its ``n_layers`` propagations."""
    if n_layers == 0:
        return x
    _, layers = stack(x, edges)
    return (x + layers.sum(0)) / (n_layers + 1)


_ITEM = ("item", "d_model")
_LAYER = ("layer", "node", "d_model")
_SCORE_SITES = {
    "user_embed": SiteSpec(("user", "d_model"), "users' final embeddings"),
    "item_embed": SiteSpec(_ITEM, "items' final embeddings"),
    "score": SiteSpec(("batch", "candidate"), "dot product of user and item embeddings"),
}


class _Scorer:
    """``forward(graph, users, items) -> (scores (batch, candidates), aux)`` from the
    family's ``embeddings(graph) -> (users, items, aux)``; ``__call__`` returns the scores."""

    def forward(self, graph, users, items):
        u, i, aux = self.embeddings(graph)
        u = site(self, "user_embed", u)
        i = site(self, "item_embed", i)
        return site(self, "score", jnp.einsum("bd,bkd->bk", u[users], i[items])), aux

    def __call__(self, graph, users, items):
        return self.forward(graph, users, items)[0]


def _embedding(module, name, rows, d_model):
    return module.param(name, nn.initializers.normal(0.1), (rows, d_model))


class MF(_Scorer, nn.Module):
    """Matrix factorization scored with BPR (Rendle et al., 2009): ``s_ui = p_u . q_i``."""

    n_users: int
    n_items: int
    d_model: int = 32
    SITES: ClassVar[dict[str, SiteSpec]] = _SCORE_SITES

    def setup(self):
        self.users = _embedding(self, "user_embedding", self.n_users, self.d_model)
        self.items = _embedding(self, "item_embedding", self.n_items, self.d_model)

    def embeddings(self, graph):
        del graph
        return self.users, self.items, {}


class LightGCN(_Scorer, nn.Module):
    """LightGCN: ID embeddings propagated ``n_layers`` hops over the normalized user-item
    graph, layers averaged: ``e = mean_k (D^-1/2 A D^-1/2)^k e_0``."""

    n_users: int
    n_items: int
    d_model: int = 32
    n_layers: int = 2
    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": SiteSpec(("node", "d_model"), "ID embeddings, users then items (layer 0)"),
        "resid_pre": SiteSpec(_LAYER, "node embeddings entering a propagation hop"),
        "resid_post": SiteSpec(_LAYER, "node embeddings after the hop"),
        **_SCORE_SITES,
    }

    def setup(self):
        self.nodes = _embedding(self, "embedding", self.n_users + self.n_items, self.d_model)
        self.stack = _stack(self.n_users + self.n_items, self.n_layers, "", "layers")

    def embeddings(self, graph):
        x = site(self, "embed", self.nodes)
        x = layer_mean(self.stack, x, graph.user_item, self.n_layers)
        return x[:self.n_users], x[self.n_users:], {}

    def layer_structure(self) -> LayerStructure:  # HasLayers
        """Hops replace (not add to) the embeddings, so there are no sublayers to name."""
        return LayerStructure(n_layers=self.n_layers, residual=("resid_pre", "resid_post"),
                              sublayers={})


class MAGNET(_Scorer, nn.Module):
    """MAGNET (form inferred, see the module docstring): dual-view graph encoding, role
    experts over behaviour / visual / text, an interaction-conditioned router.

    ``forward`` returns ``aux = {"router_probs": (item, expert)}`` for the entropy terms
    the training applies (:mod:`mechinterp.train.user_item`)."""

    n_users: int
    n_items: int
    d_model: int = 32
    n_layers: int = 2
    n_content_layers: int = 1
    SITES: ClassVar[dict[str, SiteSpec]] = {
        **LightGCN.SITES,
        "content.resid_pre": SiteSpec(("layer", "item", "d_model"),
                                      "item embeddings entering a content-graph hop"),
        "content.resid_post": SiteSpec(("layer", "item", "d_model"), "after the hop"),
        "view.interaction": SiteSpec(_ITEM, "items' user-item-graph view (layer mean)"),
        "view.content": SiteSpec(_ITEM, "items' content-graph view (layer mean)"),
        "modality.behaviour": SiteSpec(_ITEM, "the two views fused: h_b"),
        "modality.visual": SiteSpec(_ITEM, "projected visual content: h_v"),
        "modality.text": SiteSpec(_ITEM, "projected text content: h_t"),
        "moe.expert_out": SiteSpec(("item", "expert", "d_model"), "each role expert's output "
                                   "(experts in ROLES order)"),
        "moe.router_logits": SiteSpec(("item", "expert"), "router logits, from h_b"),
        "moe.router_probs": SiteSpec(("item", "expert"), "softmax of the router logits"),
        "moe_out": SiteSpec(_ITEM, "the probability-weighted sum of the experts"),
        "user.content": SiteSpec(("user", "d_model"), "one hop of the items' moe_out to users"),
    }

    def setup(self):
        n = self.n_users + self.n_items
        self.nodes = _embedding(self, "embedding", n, self.d_model)
        self.stack = _stack(n, self.n_layers, "", "layers")
        self.content_stack = _stack(self.n_items, self.n_content_layers, "content.",
                                    "content_layers")
        self.content_weight = self.param("content_weight", nn.initializers.zeros, ())
        self.visual_proj = nn.Dense(self.d_model)
        self.text_proj = nn.Dense(self.d_model)
        self.experts = [nn.Dense(self.d_model, kernel_init=nn.initializers.zeros,
                                 name=f"expert_{r}") for r in ROLES]
        self.router = nn.Dense(len(ROLES), kernel_init=nn.initializers.normal(0.01))

    def embeddings(self, graph):
        for name in ("visual", "text"):
            rows = getattr(graph, name).shape[0]
            if rows != self.n_items:
                raise ValueError(f"MAGNET has n_items={self.n_items} but graph.{name} has "
                                 f"{rows} rows; build the RecGraph from the same data")
        x = site(self, "embed", self.nodes)
        x = layer_mean(self.stack, x, graph.user_item, self.n_layers)
        users = x[:self.n_users]
        interaction = site(self, "view.interaction", x[self.n_users:])
        content = site(self, "view.content", layer_mean(
            self.content_stack, self.nodes[self.n_users:], graph.item_item,
            self.n_content_layers))
        h_b = site(self, "modality.behaviour", interaction + self.content_weight * content)
        h_v = site(self, "modality.visual", self.visual_proj(graph.visual))
        h_t = site(self, "modality.text", self.text_proj(graph.text))
        inputs = (h_b, h_v, h_t, (h_b + h_v + h_t) / 3,
                  jnp.concatenate([h_v - h_b, h_t - h_b], axis=-1))
        experts = site(self, "moe.expert_out", jnp.stack(
            [expert(h) for expert, h in zip(self.experts, inputs)], axis=1))
        logits = site(self, "moe.router_logits", self.router(h_b))
        probs = site(self, "moe.router_probs", jax.nn.softmax(logits, axis=-1))
        mixed = site(self, "moe_out", jnp.einsum("ie,ied->id", probs, experts))
        to_users = jnp.concatenate([jnp.zeros_like(users), mixed])
        user_content = site(self, "user.content", propagate(
            to_users, graph.user_item, self.n_users + self.n_items)[:self.n_users])
        return users + user_content, h_b + mixed, {"router_probs": probs}

    def layer_structure(self) -> LayerStructure:  # HasLayers
        """The user-item propagation hops (see :meth:`LightGCN.layer_structure`)."""
        return LayerStructure(n_layers=self.n_layers, residual=("resid_pre", "resid_post"),
                              sublayers={})
