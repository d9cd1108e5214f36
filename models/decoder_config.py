"""The decoder family's config: :class:`DecoderConfig` and the Hugging Face architectures
it reads and writes (:data:`ARCHITECTURES`, :data:`MOE_ARCHITECTURES`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

from .layers import ROPE_SCALING_KEYS
from .moe import BALANCE_FORMS, IMPLS, ROUTER_IMPLS, ROUTERS

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
