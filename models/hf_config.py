"""Read and validate a Hugging Face ``config.json`` into a :class:`DecoderConfig`, and back.

``config_from_hf(hf)`` checks field types and ranges as transformers 5 does, picks the
architecture (from ``architectures`` or ``model_type``), refuses what the decoder family does
not compute (sliding windows, unsupported biases, partial RoPE, mixed dense/MoE layers)
naming the field, and merges the 4.x ``rope_scaling`` and 5.x ``rope_parameters`` styles.
``config_to_hf(config)`` writes a dict both transformers 4.x and 5.x read. The checkpoint
files themselves are read and written by :mod:`mechinterp.models.hf`; the error rules are
listed in docs/errors.md.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .decoder import ARCHITECTURES, MOE_ARCHITECTURES, DecoderConfig, check_rope_scaling


MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_ARCH_BY_MODEL_TYPE = {model_type: arch for arch, model_type in MODEL_TYPES.items()}
DEFAULT_ROPE_THETA = 10000.0

# Field types of config.json, checked before use, as transformers 5 checks them (its strict
# config dataclasses refuse a string "false" for a bool or "8" for an int): a
# Python truthiness test would read "false" as True.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "intermediate_size",
                  "max_position_embeddings", "num_experts", "num_local_experts",
                  "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "decoder_sparse_step")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_NUMBERS = ("router_aux_loss_coef", "router_jitter_noise", "partial_rotary_factor")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias",
          "use_sliding_window", "norm_topk_prob", "output_router_logits")


def _check_field_types(hf: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of the wrong type or range."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for name, value in hf.items():
        if value is None:
            continue
        if name in _BOOLS and not isinstance(value, bool):
            hint = (f" (write {str(value).lower()} without quotes)"
                    if str(value).lower() in ("true", "false") else "")
            raise ValueError(f"config.json {name}={value!r} must be a JSON bool (true or "
                             f"false), got {type(value).__name__}{hint}")
        if name in _POSITIVE_INTS and (not isinstance(value, int) or isinstance(value, bool)
                                       or value <= 0):
            raise ValueError(f"config.json {name}={value!r} must be a positive integer "
                             f"(got {type(value).__name__})")
        if name in _POSITIVE_NUMBERS and (not number(value) or not value > 0):
            raise ValueError(f"config.json {name}={value!r} must be a positive number "
                             f"(got {type(value).__name__})")
        if name in _NUMBERS and not number(value):
            raise ValueError(f"config.json {name}={value!r} must be a number "
                             f"(got {type(value).__name__})")


def _architecture(hf: dict[str, Any]) -> str:
    """The one supported architecture; without ``architectures``, from ``model_type`` (as
    transformers' Auto classes do)."""
    archs = hf.get("architectures")
    if archs is None and hf.get("model_type") in _ARCH_BY_MODEL_TYPE:
        return _ARCH_BY_MODEL_TYPE[hf["model_type"]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"config.json architectures={archs!r} (model_type={hf.get('model_type')!r}) is "
            f"not supported; supported: {sorted(ARCHITECTURES)} (one entry), or no "
            f"architectures and model_type one of {sorted(_ARCH_BY_MODEL_TYPE)}"
        )
    return archs[0]


def config_from_hf(hf: dict[str, Any], **overrides) -> DecoderConfig:
    """A :class:`DecoderConfig` from a Hugging Face ``config.json`` dict.

    ``overrides`` set config fields that config.json does not decide (``dtype``,
    ``param_dtype``, ``scan_layers``). Raises ``ValueError`` naming the field for anything
    unsupported.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    _check_field_types(hf)
    arch = _architecture(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported; only 'silu' is")
    _refuse_sliding_window(hf, arch)
    _refuse_unsupported_bias(hf, arch)
    rope_theta, rope_scaling = _rope_from_hf(hf)

    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_head=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_mlp=hf["intermediate_size"],
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        architecture=arch,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        **ARCHITECTURES[arch],
    )
    if arch == "Qwen2MoeForCausalLM":
        fields["qkv_bias"] = bool(hf.get("qkv_bias", True))
    if arch in MOE_ARCHITECTURES:
        fields.update(_moe_from_hf(hf, arch))
    return DecoderConfig(**{**fields, **overrides})


def _moe_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """The :class:`DecoderConfig` MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config."""
    if arch == "MixtralForCausalLM":
        jitter = hf.get("router_jitter_noise") or 0.0
        if jitter:
            raise ValueError(f"config.json router_jitter_noise={jitter!r} is not supported "
                             "(router jitter is not implemented); use 0.0")
        fields = dict(n_experts=hf["num_local_experts"], d_expert=hf["intermediate_size"])
    else:
        step = hf.get("decoder_sparse_step", 1)
        dense_layers = hf.get("mlp_only_layers") or []
        if step != 1 or dense_layers:
            raise ValueError(
                f"config.json decoder_sparse_step={step!r}, mlp_only_layers={dense_layers!r}: "
                "mixing dense and MoE layers is not supported (every layer must be an MoE "
                "layer: decoder_sparse_step=1, mlp_only_layers=[])"
            )
        # Qwen3-MoE configs of transformers 5.x name it num_local_experts.
        n_experts = hf.get("num_experts", hf.get("num_local_experts"))
        fields = dict(n_experts=n_experts, d_expert=hf["moe_intermediate_size"],
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        if arch == "Qwen2MoeForCausalLM":
            fields.update(d_shared_expert=hf["shared_expert_intermediate_size"],
                          shared_expert_gated=True)
    coef = hf.get("router_aux_loss_coef", 0.0) if hf.get("output_router_logits") else 0.0
    return dict(fields, **MOE_ARCHITECTURES[arch], n_experts_per_tok=hf["num_experts_per_tok"],
                router_aux_loss_coef=float(coef))


def _refuse_sliding_window(hf: dict[str, Any], arch: str) -> None:
    if arch in ("MistralForCausalLM", "MixtralForCausalLM") and hf.get("sliding_window"):
        raise ValueError(
            f"config.json sliding_window={hf['sliding_window']!r}: sliding-window attention "
            "is not supported (only full causal attention); use a checkpoint with "
            "sliding_window null"
        )
    if arch.startswith("Qwen"):
        if hf.get("use_sliding_window"):
            raise ValueError(
                f"config.json use_sliding_window={hf['use_sliding_window']!r}: sliding-window "
                "attention is not supported (only full causal attention)"
            )
        layer_types = hf.get("layer_types") or []
        if "sliding_attention" in layer_types:
            raise ValueError(
                f"config.json layer_types={layer_types!r} has 'sliding_attention' layers, "
                "which are not supported (only 'full_attention')"
            )


def _refuse_unsupported_bias(hf: dict[str, Any], arch: str) -> None:
    # Llama and Qwen3 put attention_bias on q/k/v *and* o_proj; Qwen2 always has exactly a
    # q/k/v bias (its config has no switch); Mistral has none.
    if (arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
            and hf.get("attention_bias")):
        raise ValueError(
            f"config.json attention_bias={hf['attention_bias']!r} (a bias on q/k/v and "
            "o_proj) is not supported for " + arch
        )
    if arch == "LlamaForCausalLM" and hf.get("mlp_bias"):
        raise ValueError(f"config.json mlp_bias={hf['mlp_bias']!r} is not supported")


def _rope_scaling_next_to_rope_parameters(hf: dict[str, Any]) -> dict[str, Any] | None:
    """Both ``rope_scaling`` (4.x) and ``rope_parameters`` (5.x) given: transformers 5 uses
    ``rope_scaling`` when it is non-empty and fills ``rope_theta`` in from the config. We
    merge them the same way where they agree; where both set one key (other than
    ``rope_theta``) to different values, the checkpoint is ambiguous and we refuse."""
    scaling, parameters = hf.get("rope_scaling"), hf.get("rope_parameters")
    if not scaling or parameters is None:
        return None
    for name, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if not isinstance(value, dict):
            raise ValueError(f"config.json {name}={value!r} must be a JSON object")
    kind = lambda d: d.get("rope_type", d.get("type", "default"))  # noqa: E731
    differ = sorted(k for k in (set(scaling) | set(parameters)) - {"rope_theta", "type",
                                                                     "rope_type"}
                    if k in scaling and k in parameters and scaling[k] != parameters[k])
    if kind(scaling) != kind(parameters) and kind(parameters) != "default":
        differ = ["rope_type"] + differ
    if differ:
        raise ValueError(
            f"config.json has both rope_scaling={scaling!r} and rope_parameters="
            f"{parameters!r}, which disagree on {differ}; keep one of them (transformers 5 "
            "would silently use rope_scaling)")
    merged = {**parameters, **scaling, "rope_type": kind(scaling)}
    merged.pop("type", None)
    if "rope_theta" in parameters and "rope_theta" not in scaling:
        merged["rope_theta"] = parameters["rope_theta"]
    return merged


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either config style."""
    both = _rope_scaling_next_to_rope_parameters(hf)
    if both is not None:
        field, params = "rope_parameters", both
    elif hf.get("rope_parameters") is not None:  # transformers 5.x
        field, params = "rope_parameters", dict(hf["rope_parameters"])
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(
                f"config.json rope_parameters={params!r} has per-layer-type entries, which "
                "this family does not support"
            )
    else:  # transformers 4.x
        field, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"config.json partial_rotary_factor={partial!r} is not supported (RoPE must "
            "rotate the whole head)"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    try:
        scaling = check_rope_scaling({**params, "rope_type": kind})
    except ValueError as error:
        raise ValueError(f"config.json {field}: {error}") from None
    return theta, None if scaling is None else dict(scaling)


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict for ``config`` (read by transformers 4.x and 5.x)."""
    arch = config.hf_architecture
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    eos = config.eos_token_id
    hf = dict(
        architectures=[arch],
        model_type=MODEL_TYPES[arch],
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.d_head,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope,  # transformers 5.x
        rope_theta=config.rope_theta,  # transformers 4.x
        bos_token_id=config.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        pad_token_id=config.pad_token_id,
        dtype=jnp.dtype(config.param_dtype).name,
    )
    if config.rope_scaling is not None:
        hf["rope_scaling"] = dict(config.rope_scaling)  # transformers 4.x
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        hf["attention_bias"] = False
    if arch in MOE_ARCHITECTURES:
        hf.update(num_experts_per_tok=config.n_experts_per_tok,
                  router_aux_loss_coef=config.router_aux_loss_coef,
                  output_router_logits=config.router_aux_loss_coef > 0)
    if arch == "MixtralForCausalLM":
        hf.update(num_local_experts=config.n_experts, intermediate_size=config.d_expert,
                  router_jitter_noise=0.0)
    elif arch in MOE_ARCHITECTURES:
        hf.update(num_experts=config.n_experts, moe_intermediate_size=config.d_expert,
                  norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1,
                  mlp_only_layers=[])
    if arch == "Qwen2MoeForCausalLM":
        hf.update(shared_expert_intermediate_size=config.d_shared_expert,
                  qkv_bias=config.qkv_bias)
    if arch == "LlamaForCausalLM":
        hf["mlp_bias"] = False
    if arch != "LlamaForCausalLM":
        hf["sliding_window"] = None
    if arch.startswith("Qwen"):
        hf["use_sliding_window"] = False
    return hf
