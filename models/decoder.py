"""The LLaMA / Mistral / Qwen2 / Qwen3 decoder family, with Mixtral / Qwen2-MoE / Qwen3-MoE
mixture-of-experts variants.

One config, one module::

    config = DecoderConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_mlp=128)
    model = Decoder(config)
    params = model.init(jax.random.key(0), tokens)["params"]
    logits = model.apply({"params": params}, tokens)

A pre-norm residual stack of grouped-query attention (RoPE, optional q/k/v bias, optional
q/k RMSNorm) and SwiGLU MLPs, or, with ``n_experts > 0`` (:class:`MoEDecoder`), the shared
mixture-of-experts layer :class:`mechinterp.models.moe.MoE` in place of every MLP. Layers are
``nn.scan``ned (module ``layers``, parameters with a leading layer axis) or, with
``scan_layers=False``, unrolled into ``layers_0``, ``layers_1``, ... with identical
numbers (MoE layers: equal to float rounding, ~1e-6, XLA compiles them differently in a
scan); :func:`stack_layers` and :func:`unstack_layers`
convert parameter trees between the two layouts. Every activation in :attr:`Decoder.SITES`
passes through :func:`mechinterp.sites.site`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from mechinterp.sites import INTERMEDIATES, INTERVENTIONS, SiteSpec, site

from .layers import (ROPE_SCALING_KEYS, Attention, GatedMLP, RMSNorm, logical_param,
                     rope_angles, rope_inv_freq)
from .moe import AUX_LOSS, BALANCE_FORMS, IMPLS, ROUTER_IMPLS, ROUTERS, MoE

Array = jax.Array

# Logical axes of the residual stream, constrained after the embedding and after every
# layer so sharded training keeps activations laid out as the rules say (a no-op outside
# a mesh with logical-axis rules).
RESIDUAL_AXES = ("batch", "length", "embed")

# Hugging Face architectures this family reads and writes, and the features each one has.
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "MistralForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=False, qk_norm=True),
    "MixtralForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "Qwen2MoeForCausalLM": dict(qk_norm=False),  # q/k/v bias is a config switch there
    "Qwen3MoeForCausalLM": dict(qkv_bias=False, qk_norm=True),
}
# The mixture-of-experts architectures (every layer an MoE layer) and what their MoE
# layer fixes.
MOE_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "MixtralForCausalLM": dict(router="softmax", norm_topk_prob=True, d_shared_expert=0,
                               shared_expert_gated=False),
    "Qwen2MoeForCausalLM": dict(router="softmax", shared_expert_gated=True),
    "Qwen3MoeForCausalLM": dict(router="softmax", d_shared_expert=0,
                                shared_expert_gated=False),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Hyperparameters of a LLaMA-style decoder (LLaMA 2/3/3.x, Mistral, Qwen2/2.5, Qwen3).

    ``n_kv_heads`` defaults to ``n_heads`` (no grouping) and ``d_head`` to
    ``d_model // n_heads``. ``rope_scaling`` is ``None`` or a mapping with ``rope_type``
    ``"linear"`` (key ``factor``) or ``"llama3"`` (keys ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``); it is stored frozen.
    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters.
    ``architecture`` is the Hugging Face class this config came from and is saved as;
    ``None`` picks the one whose features fit (see :attr:`hf_architecture`). The token
    ids only travel to and from Hugging Face configs; the model itself never reads them.

    Mixture of experts (``n_experts > 0``; ``0`` means a dense model): every layer's MLP is
    a :class:`~mechinterp.models.moe.MoE` of ``n_experts`` SwiGLU experts of width
    ``d_expert`` (default ``d_mlp``), each token routed to ``n_experts_per_tok`` of them by
    ``router`` (``"softmax"`` or ``"sigmoid"``), the top-k weights renormalized when
    ``norm_topk_prob``. ``d_shared_expert > 0`` adds a shared SwiGLU expert of that width
    to every token (DeepSeek's ``n`` shared experts of width ``d``: ``n * d``), scaled by
    ``sigmoid(x w)`` when ``shared_expert_gated`` (Qwen2-MoE). ``router_aux_loss_coef`` and
    ``router_z_loss_coef`` weight the balance loss and router z-loss sown into the
    ``'aux_loss'`` collection (0 = not computed). ``moe_impl`` is ``"dense"`` (every expert
    on every token, the reference) or ``"ragged"`` (sorted tokens + ``ragged_dot``).
    ``router`` may also be ``"expert_choice"`` (each expert picks its top tokens of the whole
    batch: not causal); the centroid router needs centroids, so only the layer offers it.
    ``moe_router_impl``, ``moe_capacity_factor``, ``router_jitter_noise`` and
    ``router_balance_loss_form`` are the layer's ``router_impl``, ``capacity_factor``,
    ``jitter_noise`` and ``balance_loss_form`` (see :class:`~mechinterp.models.moe.MoE`).

    Dropped sublayers (:mod:`mechinterp.llm_drop`): ``attn_layers`` / ``mlp_layers`` are the
    sorted indices of the layers that keep their attention / MLP (``None``: every layer; a
    tuple naming every layer is stored as ``None``). A layer without one has neither its
    parameters nor its norm, and passes the residual through (``resid_mid`` equals
    ``resid_pre``, or ``resid_post`` equals ``resid_mid``). ``scan_layers=True`` needs
    every layer to have the same sublayers; Hugging Face formats cannot express the rest, so
    :func:`~mechinterp.models.save_hf` refuses such a model.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    n_kv_heads: int | None = None
    d_head: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    scan_layers: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    architecture: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    n_experts: int = 0
    n_experts_per_tok: int = 2
    d_expert: int | None = None
    d_shared_expert: int = 0
    shared_expert_gated: bool = False
    norm_topk_prob: bool = False
    router: str = "softmax"
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    moe_impl: str = "dense"
    moe_router_impl: str = "jnp"
    moe_capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_balance_loss_form: str = "switch"
    attn_layers: tuple[int, ...] | None = None
    mlp_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        if self.d_head is None:
            if self.n_heads > 0 and self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "pass d_head explicitly"
                )
            set_("d_head", self.d_model // max(self.n_heads, 1))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head",
                     "d_mlp", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(each kv head serves a whole group of query heads)"
            )
        if self.d_head % 2:
            raise ValueError(f"d_head={self.d_head} must be even for rotary embeddings")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        set_("rope_scaling", check_rope_scaling(self.rope_scaling))
        self._check_moe()
        self._check_kept_layers()
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))
        if self.architecture is not None:
            if self.architecture not in ARCHITECTURES:
                raise ValueError(
                    f"architecture={self.architecture!r} is not supported; supported: "
                    f"{sorted(ARCHITECTURES)} (or None to infer one)"
                )
            for feature, needed in ARCHITECTURES[self.architecture].items():
                if getattr(self, feature) != needed:
                    raise ValueError(
                        f"architecture={self.architecture!r} needs {feature}={needed}, got "
                        f"{getattr(self, feature)}; fix {feature} or set architecture=None"
                    )
            is_moe = self.architecture in MOE_ARCHITECTURES
            if is_moe != (self.n_experts > 0):
                raise ValueError(
                    f"architecture={self.architecture!r} is "
                    f"{'a mixture of experts' if is_moe else 'dense'}, but n_experts="
                    f"{self.n_experts}; fix n_experts or set architecture=None"
                )
            for feature, needed in MOE_ARCHITECTURES.get(self.architecture, {}).items():
                if getattr(self, feature) != needed:
                    raise ValueError(
                        f"architecture={self.architecture!r} needs {feature}={needed!r}, got "
                        f"{getattr(self, feature)!r}; fix {feature} or set architecture=None"
                    )

    def _check_kept_layers(self):
        for name in ("attn_layers", "mlp_layers"):
            kept = getattr(self, name)
            if kept is None:
                continue
            kept = tuple(kept)
            if (any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in kept)
                    or list(kept) != sorted(set(kept))):
                raise ValueError(f"{name} must be sorted distinct layer indices in "
                                 f"[0, {self.n_layers}) or None (every layer), got {kept!r}")
            object.__setattr__(self, name, None if len(kept) == self.n_layers else kept)
        if self.scan_layers and not self.uniform_layers:
            raise ValueError(
                f"scan_layers=True needs every layer to have the same sublayers, but "
                f"attn_layers={self.attn_layers}, mlp_layers={self.mlp_layers}; set "
                "scan_layers=False (unrolled layers)")

    def has_attention(self, layer: int) -> bool:
        """Whether layer ``layer`` keeps its attention sublayer."""
        return self.attn_layers is None or layer in self.attn_layers

    def has_mlp(self, layer: int) -> bool:
        """Whether layer ``layer`` keeps its MLP (or MoE) sublayer."""
        return self.mlp_layers is None or layer in self.mlp_layers

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer has the same sublayers (needed by ``scan_layers=True``)."""
        return all(kept in (None, ()) for kept in (self.attn_layers, self.mlp_layers))

    def _check_moe(self):
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ValueError(f"n_experts must be an int >= 0 (0 = dense), got "
                             f"{self.n_experts!r}")
        if self.d_expert is None:
            object.__setattr__(self, "d_expert", self.d_mlp)
        if self.n_experts == 0:
            return
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(
                f"n_experts_per_tok={self.n_experts_per_tok} must be between 1 and "
                f"n_experts={self.n_experts}"
            )
        if not isinstance(self.d_expert, int) or self.d_expert <= 0:
            raise ValueError(f"d_expert must be a positive int, got {self.d_expert!r}")
        if self.d_shared_expert < 0:
            raise ValueError(f"d_shared_expert must be >= 0, got {self.d_shared_expert!r}")
        if self.shared_expert_gated and self.d_shared_expert == 0:
            raise ValueError("shared_expert_gated=True needs a shared expert "
                             "(d_shared_expert > 0)")
        routers = tuple(r for r in ROUTERS if r != "centroid")
        if self.router not in routers:
            raise ValueError(f"router={self.router!r} is not supported by the decoder; "
                             f"supported: {routers} (the centroid router needs centroids: "
                             "use mechinterp.models.moe.MoE)")
        for name, allowed in (("moe_impl", IMPLS), ("moe_router_impl", ROUTER_IMPLS),
                              ("router_balance_loss_form", BALANCE_FORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; "
                                 f"supported: {allowed}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            raise ValueError(f"moe_capacity_factor must be > 0 (or None for dropless), got "
                             f"{self.moe_capacity_factor!r}")
        if not self.router_jitter_noise >= 0:
            raise ValueError(f"router_jitter_noise must be >= 0, got "
                             f"{self.router_jitter_noise!r}")

    @property
    def hf_architecture(self) -> str:
        """The Hugging Face architecture: ``architecture``, or the one whose features fit."""
        if self.architecture is not None:
            return self.architecture
        for name, needed in ARCHITECTURES.items():
            moe_needs = MOE_ARCHITECTURES.get(name)
            if (moe_needs is not None) != (self.n_experts > 0):
                continue
            needed = {**needed, **(moe_needs or {})}
            if all(getattr(self, key) == value for key, value in needed.items()):
                return name
        raise ValueError(
            "no supported Hugging Face architecture has these features (qkv_bias="
            f"{self.qkv_bias}, qk_norm={self.qk_norm}, n_experts={self.n_experts}, "
            f"router={self.router!r}, norm_topk_prob={self.norm_topk_prob}, d_shared_expert="
            f"{self.d_shared_expert}, shared_expert_gated={self.shared_expert_gated}); "
            "this config can run but cannot be saved in Hugging Face format"
        )


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> FrozenDict | None:
    """Validated, frozen ``rope_scaling`` (``None`` for plain RoPE)."""
    if scaling is None or scaling.get("rope_type") == "default":
        return None
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"rope_scaling rope_type={kind!r} is not supported; supported: "
            f"{sorted(ROPE_SCALING_KEYS)}, or rope_scaling=None for plain RoPE"
        )
    missing = [key for key in ROPE_SCALING_KEYS[kind] if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of rope_type={kind!r} is missing keys {missing}")
    return FrozenDict({key: scaling[key] for key in ("rope_type", *ROPE_SCALING_KEYS[kind])})


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    ``k``, ``v``: (layer, batch, max_len, kv_head, d_head), keys already rotated.
    ``index``: the next slot to write (shared by the batch). ``key_mask`` (batch, max_len):
    which slots hold real tokens. ``next_position`` (batch,): the RoPE position of each
    row's next token. Writing past ``max_len`` is not checked inside ``jit``: size the cache
    for the prompt plus every generated token.
    """

    k: Array
    v: Array
    index: Array
    key_mask: Array
    next_position: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: DecoderConfig, batch: int, max_len: int) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` rows of up to ``max_len`` tokens."""
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.d_head)
    return KVCache(
        k=jnp.zeros(shape, config.dtype),
        v=jnp.zeros(shape, config.dtype),
        index=jnp.zeros((), jnp.int32),
        key_mask=jnp.zeros((batch, max_len), bool),
        next_position=jnp.zeros((batch,), jnp.int32),
    )


class Block(nn.Module):
    """One pre-norm layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (``mlp`` is the
    MoE layer, its output the site ``moe_out``, when ``config.n_experts > 0``).

    ``__call__(x, rope, mask, cache, cache_index) -> (x, new_cache)``, the signature
    ``nn.scan`` needs (carry first; ``cache`` is this layer's ``(k, v)`` or ``None``).
    Without ``has_attn`` / ``has_mlp`` that sublayer (and its norm) is absent: the residual
    passes through and the cache comes back unchanged.
    """

    config: DecoderConfig
    has_attn: bool = True
    has_mlp: bool = True

    @nn.compact
    def __call__(self, x, rope, mask, cache, cache_index):
        c = self.config
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype,
                                 param_dtype=c.param_dtype)
        attention = Attention(
            n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, d_head=c.d_head,
            qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, norm_eps=c.rms_norm_eps,
            dtype=c.dtype, param_dtype=c.param_dtype, name="attn",
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
                      dtype=c.dtype, param_dtype=c.param_dtype, name="moe")
            out_site = "moe_out"
        else:
            mlp = GatedMLP(d_mlp=c.d_mlp, activation=nn.silu, dtype=c.dtype,
                           param_dtype=c.param_dtype, name="mlp")
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


def _mask_and_positions(shape, attention_mask, positions, start=0):
    """The boolean token mask (all real without ``attention_mask``) and int32 RoPE
    positions: by default each row counts its real tokens from ``start``."""
    mask = (jnp.ones(shape, bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    if positions is None:
        positions = start + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    return mask, jnp.asarray(positions, jnp.int32)


def _layer(axes: str) -> tuple[str, ...]:
    """Axes of a per-layer site: a leading layer axis, then batch, then ``axes``."""
    return ("layer", "batch", *axes.split())


class Decoder(nn.Module):
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
    - ``prefix``: a :class:`KVCache` read but not returned: the tokens sit at slots
      ``prefix.index ...`` and attend to the earlier slots' keys and values. Used with
      ``residual`` to resume a forward part-way (see :meth:`resume`).

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
                 prefix: KVCache | None = None, logit_columns: Array | None = None):
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
        mask, positions = _mask_and_positions(
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
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, has_attn=c.has_attention(0), has_mlp=c.has_mlp(0), name="layers")
            x, new_layer_cache = layers(x, rope, attend, layer_cache, index)
        else:
            per_layer = []
            for i in range(c.n_layers):
                this = None if cache is None else jax.tree.map(lambda a: a[i], layer_cache)
                x, new = Block(c, has_attn=c.has_attention(i), has_mlp=c.has_mlp(i),
                               name=f"layers_{i}")(x, rope, attend, this, index)
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

    # ------------------------------------------------------------------ resuming a forward
    # The protocol mechinterp's sweeps use to skip work a patch cannot change: a patch at
    # layer l, position p leaves every layer below l, and (causal attention) every position
    # before p at every layer, as they were in the unpatched run.

    def resume_state(self, params, tokens, attention_mask=None, positions=None):
        """What :meth:`resume` needs from one forward of ``tokens``: the residual stream
        entering every layer (layer, batch, pos, d_model), every layer's keys (rotated) and
        values, the key mask and the RoPE positions. ``None`` for a model whose layers
        differ (dropped sublayers): its sites do not stack into one layer axis."""
        from mechinterp.api import capture  # the analysis core reads sites; no cycle

        c = self.config
        if not c.uniform_layers:
            return None
        mask, positions = _mask_and_positions(tokens.shape, attention_mask, positions)
        (_, cache), sites = capture(self, params, tokens, mask, positions,
                                    cache=init_cache(c, *tokens.shape), sites=["resid_pre"])
        return dict(residual=sites["resid_pre"], k=cache.k, v=cache.v, key_mask=mask,
                    positions=positions)

    def resume(self, params, state, first_layer: int, first_pos: int):
        """``(model, params, kwargs)`` computing, from layer ``first_layer`` on and for
        positions ``first_pos`` on, what this model computes on the inputs ``state`` came
        from (:meth:`resume_state`): ``model.apply({"params": params}, None, **kwargs)``.

        The returned model has ``n_layers - first_layer`` layers; its per-layer sites are
        the original ones sliced ``[first_layer:]`` on the layer axis and ``[first_pos:]``
        on ``pos``/``query_pos`` (``key_pos`` keeps every position); its logits are those
        of positions ``first_pos ...``.
        """
        c = self.config
        if not 0 <= first_layer < c.n_layers:
            raise ValueError(f"first_layer={first_layer} is not a layer of this "
                             f"{c.n_layers}-layer model")
        length = state["key_mask"].shape[1]
        if not 0 <= first_pos < length:
            raise ValueError(f"first_pos={first_pos} is not a position of these "
                             f"{length}-token inputs")
        def shifted(kept):  # kept-sublayer indices of a dropped model, renumbered
            return None if kept is None else tuple(i - first_layer for i in kept
                                                   if i >= first_layer)

        tail = self.clone(parent=None, config=dataclasses.replace(
            c, n_layers=c.n_layers - first_layer, attn_layers=shifted(c.attn_layers),
            mlp_layers=shifted(c.mlp_layers)))
        params = dict(params)
        if c.scan_layers:
            params["layers"] = jax.tree.map(lambda a: a[first_layer:], params["layers"])
        else:
            for i in range(c.n_layers):
                layer = params.pop(f"layers_{i}")
                if i >= first_layer:
                    params[f"layers_{i - first_layer}"] = layer
        prefix = KVCache(
            k=state["k"][first_layer:], v=state["v"][first_layer:],
            index=jnp.asarray(first_pos, jnp.int32), key_mask=state["key_mask"],
            next_position=state["positions"][:, first_pos],
        )
        kwargs = dict(residual=state["residual"][first_layer][:, first_pos:],
                      attention_mask=state["key_mask"][:, first_pos:],
                      positions=state["positions"][:, first_pos:], prefix=prefix)
        return tail, params, kwargs


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


_UNROLLED = re.compile(r"layers_(\d+)")


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled layout (``layers_0``, ``layers_1``, ...) to scanned layout (``layers`` with a
    leading layer axis). Works on any collection tree (params, intermediates, ...);
    boxed (logically partitioned) leaves are unboxed first."""
    params = dict(nn.meta.unbox(params))
    indices = sorted(int(m.group(1)) for k in params if (m := _UNROLLED.fullmatch(k)))
    if not indices or indices != list(range(len(indices))):
        raise ValueError(
            f"stack_layers needs keys layers_0 ... layers_N-1, got {sorted(params)}"
        )
    layers = [params.pop(f"layers_{i}") for i in indices]
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def unstack_layers(params: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """Scanned layout (``layers`` with a leading layer axis) to unrolled layout
    (``layers_0`` ... ``layers_{n_layers-1}``); the inverse of :func:`stack_layers`."""
    params = dict(nn.meta.unbox(params))
    if "layers" not in params:
        raise ValueError(f"unstack_layers needs a 'layers' entry, got {sorted(params)}")
    layers = params.pop("layers")
    sizes = {a.shape[0] for a in jax.tree.leaves(layers)}
    if sizes != {n_layers}:
        raise ValueError(f"the layer axis has sizes {sorted(sizes)}, expected {n_layers}")
    unrolled = {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], layers)
                for i in range(n_layers)}
    return {**params, **unrolled}
