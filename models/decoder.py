"""The LLaMA / Mistral / Qwen2 / Qwen3 decoder family, with Mixtral / Qwen2-MoE / Qwen3-MoE
mixture-of-experts variants::

    model = Decoder(DecoderConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_mlp=128))
    params = model.init(jax.random.key(0), tokens)["params"]
    logits = model.apply({"params": params}, tokens)

A pre-norm residual stack of grouped-query attention and SwiGLU MLPs (or, with
``n_experts > 0``, :class:`MoEDecoder`: the shared MoE layer in place of every MLP). Layers
are ``nn.scan``ned (``layers``) or unrolled (``layers_0``, ...) with identical numbers (MoE:
to float rounding). Config: :mod:`.decoder_config`; KV cache, layouts and the family
protocol (:mod:`mechinterp.family`): :mod:`.decoder_capabilities`.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .decoder_capabilities import (DecoderCapabilities, KVCache, init_cache,
                                   mask_and_positions, stack_layers, unstack_layers)
from .decoder_config import (ARCHITECTURES, MOE_ARCHITECTURES, DecoderConfig,
                             check_rope_scaling)
from .layers import Attention, GatedMLP, RMSNorm, logical_param, rope_angles, rope_inv_freq
from .moe import AUX_LOSS, MoE

__all__ = ["ARCHITECTURES", "MOE_ARCHITECTURES", "Block", "Decoder", "DecoderConfig",
           "KVCache", "MoEDecoder", "check_rope_scaling", "decoder_class", "init_cache",
           "stack_layers", "unstack_layers"]

Array = jax.Array

# Logical axes of the residual stream, constrained after the embedding and after every
# layer so sharded training keeps activations laid out as the rules say (a no-op outside
# a mesh with logical-axis rules).
RESIDUAL_AXES = ("batch", "length", "embed")


class Block(nn.Module):
    """One pre-norm layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (``mlp`` is the
    MoE layer, its output the site ``moe_out``, when ``config.n_experts > 0``).

    ``__call__(x, rope, mask, cache, cache_index, active=None) -> (x, new_cache)``, the
    signature ``nn.scan`` needs (carry first; ``cache`` is this layer's ``(k, v)`` or
    ``None``). ``active`` (a bool scalar, may be traced; ``None`` = on): off skips the layer
    (``lax.cond``: the residual and the cache pass through, nothing is computed).
    Without ``has_attn`` / ``has_mlp`` that sublayer (and its norm) is absent: the residual
    passes through and the cache comes back unchanged.
    """

    config: DecoderConfig
    has_attn: bool = True
    has_mlp: bool = True

    @nn.compact
    def __call__(self, x, rope, mask, cache, cache_index, active=None):
        if active is None:
            return self._layer(x, rope, mask, cache, cache_index)
        if self.is_initializing() or any(map(self.is_mutable_collection,
                                             (INTERMEDIATES, AUX_LOSS))):
            # Recording sites (or creating parameters) needs every branch the same: run
            # the layer and select, which gives the numbers the skip gives.
            y, new_cache = self._layer(x, rope, mask, cache, cache_index)
            return jnp.where(active, y, x), new_cache
        return nn.cond(active, Block._layer, lambda mdl, x, *rest: (x, rest[2]), self, x,
                       rope, mask, cache, cache_index)

    def _layer(self, x, rope, mask, cache, cache_index):
        c = self.config
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype,
                                 param_dtype=c.param_dtype, parent=self)
        attention = Attention(
            n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, d_head=c.d_head,
            qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps,
            dtype=c.dtype, param_dtype=c.param_dtype, parent=self, name="attn",
        )
        if c.n_experts > 0:
            mlp = MoE(n_experts=c.n_experts, n_experts_per_tok=c.n_experts_per_tok,
                      d_expert=c.d_expert, router=c.router, norm_topk_prob=c.norm_topk_prob,
                      d_shared=c.d_shared_expert, shared_expert_gated=c.shared_expert_gated,
                      aux_loss_coef=c.router_aux_loss_coef, z_loss_coef=c.router_z_loss_coef,
                      impl=c.moe_impl, router_impl=c.moe_router_impl,
                      capacity_factor=c.moe_capacity_factor,
                      jitter_noise=c.router_jitter_noise,
                      balance_loss_form=c.router_balance_loss_form,
                      dtype=c.dtype, param_dtype=c.param_dtype, parent=self, name="moe")
            out_site = "moe_out"
        else:
            mlp = GatedMLP(d_mlp=c.d_mlp, activation=nn.silu, dtype=c.dtype,
                           param_dtype=c.param_dtype, parent=self, name="mlp")
            out_site = "mlp_out"

        x = site(self, "resid_pre", x)
        new_cache = cache
        if self.has_attn:
            attn_out, new_cache = attention(norm(name="attn_norm")(x), rope, mask, cache,
                                            cache_index)
            x = x + site(self, "attn_out", attn_out)
        x = site(self, "resid_mid", x)
        if self.has_mlp:
            x = x + site(self, out_site, mlp(norm(name="mlp_norm")(x)))
        x = site(self, "resid_post", x)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        return x, new_cache


def _layer(axes: str) -> tuple[str, ...]:
    """Axes of a per-layer site: a leading layer axis, then batch, then ``axes``."""
    return ("layer", "batch", *axes.split())


class Decoder(DecoderCapabilities, nn.Module):
    """A LLaMA-style decoder-only language model; see :class:`DecoderConfig`.

    ``__call__(tokens, attention_mask=None, positions=None, cache=None, logit_positions=None)``

    - ``tokens``: int (batch, pos).
    - ``attention_mask``: (batch, pos), 1 for real tokens and 0 for padding (pad on the
      left for generation). Padded keys are never attended to.
    - ``positions``: RoPE positions (batch, pos); by default each row counts its real
      tokens (``cumsum(mask) - 1``, clipped at 0, continuing from the cache), so a
      left-padded row gives the same logits for its real tokens as the unpadded one.
    - ``cache``: a :class:`KVCache` (from :func:`init_cache`); the tokens are written at
      ``cache.index`` and attend to every earlier real slot.
    - ``logit_positions``: int (batch, k); if given, logits are computed only at these
      positions (a metric that reads one answer position skips the unembedding elsewhere).
    - ``logit_columns``: int (batch, n); if given, logits are computed only for these
      vocabulary entries (per example), shape (batch, pos, n): a logit difference reads two.
    - ``residual``: (batch, pos, d_model); if given, the stream entering the first layer in
      place of the token embeddings (``tokens`` may then be ``None``; the ``embed`` site is
      not reached).
    - ``first_layer``: int32 scalar (may be traced) with ``residual``: the residual enters
      this layer; earlier layers are skipped (``lax.cond``) and pass it on unchanged.
    - ``prefix``: a :class:`KVCache` read but not returned: the tokens sit at slots
      ``prefix.index ...`` and attend to the earlier slots' keys and values. Used with
      ``residual`` to resume a forward part-way (see
      :meth:`~mechinterp.models.decoder_capabilities.DecoderCapabilities.resume`).

    Returns logits (batch, pos, vocab), or ``(logits, new_cache)`` when given a cache.
    With a cache, sites see only the tokens of this call, and ``attn.pattern``'s
    ``key_pos`` axis spans all ``max_len`` cache slots.
    """

    config: DecoderConfig

    SITES: ClassVar[dict[str, SiteSpec]] = {
        "embed": SiteSpec(("batch", "pos", "d_model"), "token embeddings"),
        "resid_pre": SiteSpec(_layer("pos d_model"), "residual stream entering the layer"),
        "attn.q": SiteSpec(_layer("pos head d_head"),
                           "queries after bias and q-norm, before RoPE"),
        "attn.k": SiteSpec(_layer("pos kv_head d_head"),
                           "keys after bias and k-norm, before RoPE (kv heads, not repeated)"),
        "attn.v": SiteSpec(_layer("pos kv_head d_head"), "values (kv heads, not repeated)"),
        "attn.pattern": SiteSpec(_layer("head query_pos key_pos"),
                                 "attention probabilities (softmax over key_pos)"),
        "attn.z": SiteSpec(_layer("pos head d_head"), "pattern-weighted values per head"),
        "attn.head_out": SiteSpec(_layer("pos head d_model"),
                                  "each head's write to the residual stream"),
        "attn_out": SiteSpec(_layer("pos d_model"), "attention output (sum over heads)"),
        "resid_mid": SiteSpec(_layer("pos d_model"), "residual stream after attention"),
        "mlp.pre": SiteSpec(_layer("pos d_mlp"), "gate pre-activation"),
        "mlp.hidden": SiteSpec(_layer("pos d_mlp"), "neurons: act(gate) * up"),
        "mlp_out": SiteSpec(_layer("pos d_model"), "MLP output"),
        "resid_post": SiteSpec(_layer("pos d_model"), "residual stream leaving the layer"),
        "final_norm": SiteSpec(("batch", "pos", "d_model"), "residual after the final norm"),
        "logits": SiteSpec(("batch", "pos", "vocab"), "next-token logits"),
    }

    # Whether this class runs mixture-of-experts configs (n_experts > 0) or dense ones.
    MOE: ClassVar[bool] = False

    @property
    def dtype(self):
        """Compute dtype (read by :func:`logical_param`)."""
        return self.config.dtype

    @property
    def param_dtype(self):
        """Parameter storage dtype (read by :func:`logical_param`)."""
        return self.config.param_dtype

    @nn.compact
    def __call__(self, tokens: Array, attention_mask: Array | None = None,
                 positions: Array | None = None, cache: KVCache | None = None,
                 logit_positions: Array | None = None, residual: Array | None = None,
                 prefix: KVCache | None = None, logit_columns: Array | None = None,
                 first_layer: Array | None = None):
        c = self.config
        if (c.n_experts > 0) != self.MOE:
            raise ValueError(
                f"{type(self).__name__} runs {'MoE' if self.MOE else 'dense'} configs but "
                f"config.n_experts={c.n_experts}; use "
                f"{'Decoder' if self.MOE else 'MoEDecoder'} (or decoder_class(config))"
            )
        if prefix is not None:
            if cache is not None:
                raise ValueError("pass either cache= (read and returned) or prefix= (read "
                                 "only), not both")
            cache = prefix
        if residual is None and tokens is None:
            raise ValueError("pass tokens, or residual= (the stream entering the first layer)")
        if first_layer is not None and residual is None:
            raise ValueError("first_layer= skips layers, so it needs residual= (the stream "
                             "entering that layer)")
        active = (None if first_layer is None
                  else jnp.arange(c.n_layers) >= jnp.asarray(first_layer, jnp.int32))
        mask, positions = mask_and_positions(
            (tokens if residual is None else residual).shape[:2], attention_mask, positions,
            start=0 if cache is None else cache.next_position[:, None])
        length = mask.shape[1]

        if cache is None:
            key_mask, query_slots, key_slots = mask, jnp.arange(length), jnp.arange(length)
            layer_cache, index = None, None
        else:
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, index))
            query_slots, key_slots = index + jnp.arange(length), jnp.arange(cache.max_len)
            layer_cache = (cache.k, cache.v)
        causal = key_slots[None, :] <= query_slots[:, None]
        attend = key_mask[:, None, :] & causal[None]
        rope = rope_angles(positions, rope_inv_freq(c.d_head, c.rope_theta, c.rope_scaling),
                           c.dtype)

        embedding = logical_param(self, "embedding", ("vocab", "embed"),
                                  (c.vocab_size, c.d_model))
        if residual is None:
            x = site(self, "embed", jnp.take(embedding, tokens, axis=0))
        else:
            x = jnp.asarray(residual, c.dtype)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)

        if c.scan_layers:
            layers = nn.scan(
                Block,
                variable_axes={"params": 0, INTERMEDIATES: 0, INTERVENTIONS: 0, AUX_LOSS: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, has_attn=c.has_attention(0), has_mlp=c.has_mlp(0), name="layers")
            x, new_layer_cache = layers(x, rope, attend, layer_cache, index, active)
        else:
            per_layer = []
            for i in range(c.n_layers):
                this = None if cache is None else jax.tree.map(lambda a: a[i], layer_cache)
                x, new = Block(c, has_attn=c.has_attention(i), has_mlp=c.has_mlp(i),
                               name=f"layers_{i}")(x, rope, attend, this, index,
                                                   None if active is None else active[i])
                per_layer.append(new)
            new_layer_cache = (None if cache is None
                               else jax.tree.map(lambda *a: jnp.stack(a), *per_layer))

        x = RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                    name="norm")(x)
        x = site(self, "final_norm", x)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logit_positions)[..., None], axis=1)
        unembed = (embedding.T if c.tie_embeddings else
                   logical_param(self, "lm_head", ("embed", "vocab"), (c.d_model, c.vocab_size)))
        if logit_columns is None:
            logits = jnp.einsum("bte,ev->btv", x, unembed)
        else:
            columns = jnp.take(unembed, jnp.asarray(logit_columns), axis=1)  # (embed, b, n)
            logits = jnp.einsum("bte,ebn->btn", x, columns)
        logits = site(self, "logits", logits)
        if cache is None or prefix is not None:
            return logits

        last = jnp.max(jnp.where(mask, positions, -1), axis=1) + 1
        new_cache = KVCache(
            k=new_layer_cache[0], v=new_layer_cache[1], index=index + length,
            key_mask=key_mask,
            next_position=jnp.where(mask.any(axis=1), last, cache.next_position),
        )
        return logits, new_cache

_MOE_SITES = {
        "moe.router_logits": SiteSpec(_layer("pos expert"), "router logits, one per expert"),
        "moe.router_probs": SiteSpec(_layer("pos expert"),
                                     "router probabilities: softmax or sigmoid of the logits"),
        "moe.topk_indices": SiteSpec(_layer("pos topk"),
                                     "the experts each token is routed to, best first"),
        "moe.topk_weights": SiteSpec(_layer("pos topk"),
                                     "routing weight of each selected expert (0 if dropped)"),
        "moe.weights": SiteSpec(_layer("pos expert"),
                                "combine weight of each expert: top-k weight, 0 if not routed"),
        "moe.expert_in": SiteSpec(_layer("pos expert d_model"),
                                  "the input each expert sees (the token, unless edited)"),
        "moe.expert_out": SiteSpec(_layer("pos expert d_model"),
                                   "each expert's weighted write to the residual stream"),
        "moe.shared_out": SiteSpec(_layer("pos d_model"),
                                   "shared expert output, after its gate (if any)"),
        "moe_out": SiteSpec(_layer("pos d_model"),
                            "MoE layer output (routed experts plus shared expert)"),
}


class MoEDecoder(Decoder):
    """The mixture-of-experts decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-style shared
    experts): :class:`Decoder` with ``config.n_experts > 0``, every layer's MLP replaced by
    :class:`mechinterp.models.moe.MoE`. Same call signature and outputs as :class:`Decoder`;
    its sites swap ``mlp.pre``, ``mlp.hidden``, ``mlp_out`` for the ``moe.*`` sites and
    ``moe_out`` (``moe.shared_out`` only with a shared expert). Auxiliary losses are sown
    per layer into the ``'aux_loss'`` collection (leading layer axis).
    """

    MOE: ClassVar[bool] = True
    SITES: ClassVar[dict[str, SiteSpec]] = {
        **{name: spec for name, spec in Decoder.SITES.items()
           if name not in ("mlp.pre", "mlp.hidden", "mlp_out", "resid_post", "final_norm",
                           "logits")},
        **_MOE_SITES,
        **{name: Decoder.SITES[name] for name in ("resid_post", "final_norm", "logits")},
    }


def decoder_class(config: DecoderConfig) -> type[Decoder]:
    """:class:`MoEDecoder` for a mixture-of-experts config, :class:`Decoder` otherwise."""
    return MoEDecoder if config.n_experts > 0 else Decoder


