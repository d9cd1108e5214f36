"""Load GGUF checkpoints (llama.cpp's single-file format) of the decoder family.

``load_gguf(path)`` reads a ``.gguf`` file with :mod:`mechinterp.models.gguf_file` (our own
header reader over a numpy memory map; dequantization by ``gguf.quants``; no torch) and hands
the result to the Hugging Face conversion: the GGUF metadata becomes a ``config.json``-style
dict for :func:`~mechinterp.models.hf_config.config_from_hf` and the GGUF tensors get their
Hugging Face names for the tensor layout of :mod:`mechinterp.models.hf`, so both formats
share one config check and one layout. ``load_gguf_tokenizer(path)`` builds the tokenizer
the metadata describes.

Supported GGUF architectures (``general.architecture``): ``llama`` (LLaMA, Mistral, and
Mixtral when the file has expert tensors), ``qwen2``, ``qwen3``, ``qwen2moe``, ``qwen3moe``.
The ``attn_q`` / ``attn_k`` rows llama.cpp's converter permutes in ``llama`` files are
permuted back to the Hugging Face layout. Design notes: docs/decisions.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .decoder import Decoder, decoder_class
from .gguf_file import _check_tensor_types, _dequantize, _read
from .hf import _assembled, _put, _tensors
from .hf_config import config_from_hf
from .layers import rope_inv_freq


# general.architecture -> the Hugging Face class (dense, mixture of experts).
GGUF_ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "llama": ("LlamaForCausalLM", "MixtralForCausalLM"),
    "qwen2": ("Qwen2ForCausalLM", None),
    "qwen3": ("Qwen3ForCausalLM", None),
    "qwen2moe": (None, "Qwen2MoeForCausalLM"),
    "qwen3moe": (None, "Qwen3MoeForCausalLM"),
}
# Architectures whose attn_q / attn_k rows llama.cpp's converter permutes.
PERMUTED_ARCHITECTURES = frozenset({"llama"})

# GGUF tensor name (without blk.{i}.) -> Hugging Face name (without model.layers.{i}.).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# Stacked expert tensors (experts, out, in) and the Hugging Face per-expert names.
_EXPERT_NAMES = {"ffn_gate_exps": ("w1", "gate_proj"), "ffn_up_exps": ("w3", "up_proj"),
                 "ffn_down_exps": ("w2", "down_proj")}
_OLD_MIXTRAL_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # one tensor per expert


class GGUFTokenizer(NamedTuple):
    """What :func:`load_gguf_tokenizer` returns: the ``tokenizers.Tokenizer`` (it adds no
    special tokens when encoding), the special token ids from the metadata, and whether the
    model expects a BOS token in front of every prompt (``tokenizer.ggml.add_bos_token``)."""

    tokenizer: Any
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


# --------------------------------------------------------------------------- metadata


def _get(meta: dict, key: str, path: Path, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
    return default


def _float32_value(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not
    9.999999747378752e-06): the shortest repr that rounds to the same float32."""
    return float(str(np.float32(x)))


def hf_config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                        path: Path | str = "<gguf>") -> dict[str, Any]:
    """A Hugging Face ``config.json``-style dict from GGUF metadata and tensor shapes
    (numpy order), for :func:`~mechinterp.models.hf.config_from_hf`."""
    path = Path(path)
    gguf_arch = _get(meta, "general.architecture", path)
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {gguf_arch!r} is not supported; "
                         f"supported: {sorted(GGUF_ARCHITECTURES)}")
    a = gguf_arch
    has_experts = any(".ffn_gate_inp.weight" in n or _OLD_MIXTRAL_EXPERT.search(n)
                      for n in tensor_shapes)
    arch = GGUF_ARCHITECTURES[a][1 if has_experts else 0]
    if arch is None:
        kind = "expert" if has_experts else "no expert"
        raise ValueError(f"{path}: GGUF architecture {a!r} with {kind} tensors is not "
                         "supported")
    if arch == "LlamaForCausalLM" and "mistral" in str(meta.get("general.name", "")).lower():
        arch = "MistralForCausalLM"  # same numbers; only the saved class differs

    d_model = int(_get(meta, f"{a}.embedding_length", path))
    heads = int(_get(meta, f"{a}.attention.head_count", path))
    kv_heads = _get(meta, f"{a}.attention.head_count_kv", path, heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{path}: {a}.attention.head_count_kv={kv_heads!r} varies per "
                             "layer, which is not supported")
        kv_heads = kv_heads[0]
    d_head = int(_get(meta, f"{a}.attention.key_length", path, d_model // heads))
    value_length = int(_get(meta, f"{a}.attention.value_length", path, d_head))
    if value_length != d_head:
        raise ValueError(f"{path}: {a}.attention.value_length={value_length} differs from "
                         f"key_length={d_head}, which is not supported")
    rope_dims = int(_get(meta, f"{a}.rope.dimension_count", path, d_head))
    if rope_dims != d_head:
        raise ValueError(f"{path}: {a}.rope.dimension_count={rope_dims} rotates only part of "
                         f"the head (head dim {d_head}); partial RoPE is not supported")
    embed = tensor_shapes.get("token_embd.weight")
    vocab = _get(meta, f"{a}.vocab_size", path, None)
    if vocab is None:
        vocab = embed[0] if embed else len(_get(meta, "tokenizer.ggml.tokens", path))
    hf: dict[str, Any] = dict(
        architectures=[arch],
        vocab_size=int(vocab),
        hidden_size=d_model,
        num_hidden_layers=int(_get(meta, f"{a}.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=d_head,
        rms_norm_eps=_float32_value(_get(meta, f"{a}.attention.layer_norm_rms_epsilon", path)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        max_position_embeddings=int(_get(meta, f"{a}.context_length", path, 4096)),
        hidden_act="silu",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        attention_bias="blk.0.attn_output.bias" in tensor_shapes,
    )
    theta = _float32_value(_get(meta, f"{a}.rope.freq_base", path, 10000.0))
    hf["rope_theta"] = theta
    hf["rope_scaling"] = _rope_scaling(meta, a, path, theta, d_head,
                                       "rope_freqs.weight" in tensor_shapes)
    ffn = meta.get(f"{a}.feed_forward_length")
    if has_experts:
        hf.update(num_experts_per_tok=int(_get(meta, f"{a}.expert_used_count", path)))
        n_experts = int(_get(meta, f"{a}.expert_count", path))
        gate = tensor_shapes.get("blk.0.ffn_gate_exps.weight")
        d_expert = gate[1] if gate else int(_get(meta, f"{a}.expert_feed_forward_length",
                                                 path, ffn))
        if arch == "MixtralForCausalLM":
            hf.update(num_local_experts=n_experts, intermediate_size=d_expert)
        else:
            # llama.cpp renormalizes the top-k weights for qwen3moe and not for qwen2moe
            # (its build_moe_ffn norm_w argument); files of these architectures carry no
            # flag, but a {arch}.expert_weights_norm key, where present, decides.
            norm = meta.get(f"{a}.expert_weights_norm", arch == "Qwen3MoeForCausalLM")
            hf.update(num_experts=n_experts, moe_intermediate_size=d_expert,
                      intermediate_size=int(ffn or d_expert), norm_topk_prob=bool(norm))
        if arch == "Qwen2MoeForCausalLM":
            shared = tensor_shapes.get("blk.0.ffn_gate_shexp.weight")
            hf["shared_expert_intermediate_size"] = int(
                shared[0] if shared else _get(meta, f"{a}.expert_shared_feed_forward_length",
                                              path))
            hf["qkv_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    else:
        hf["intermediate_size"] = int(_get(meta, f"{a}.feed_forward_length", path))
    return hf


def _rope_scaling(meta: dict, a: str, path: Path, theta: float, d_head: int,
                  has_rope_freqs: bool) -> dict[str, Any] | None:
    kind = meta.get(f"{a}.rope.scaling.type", "none")
    if kind == "linear":
        factor = _float32_value(_get(meta, f"{a}.rope.scaling.factor", path))
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    if kind != "none":
        raise ValueError(f"{path}: {a}.rope.scaling.type={kind!r} is not supported; supported: "
                         "'none', 'linear', and Llama 3 scaling (a rope_freqs tensor)")
    if not has_rope_freqs:
        return None
    # Llama 3.x: llama.cpp stores the per-frequency divisors, not their parameters; fitted by
    # _llama3_scaling once the tensor is read.
    return {"rope_type": "llama3", "factor": None,
            "original_max_position_embeddings": int(
                meta.get(f"{a}.rope.scaling.original_context_length", 8192))}


def _llama3_scaling(path: Path, rope_freqs: np.ndarray, theta: float, d_head: int,
                    original: int) -> dict[str, Any]:
    """The Hugging Face ``llama3`` rope scaling whose frequencies are those of the file's
    ``rope_freqs`` (llama.cpp divides each inverse frequency by it). The file keeps only
    the divisors: this takes the factor from them and Llama 3.1's low/high frequency
    factors (1, 4), and refuses a file whose divisors those do not reproduce."""
    freqs = np.asarray(rope_freqs, np.float32).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    plain = rope_inv_freq(d_head, theta)
    ours = rope_inv_freq(d_head, theta, scaling)
    if freqs.shape != plain.shape or not np.allclose(plain / freqs, ours, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: tensor rope_freqs.weight does not match Llama 3 rope "
                         f"scaling with {scaling}; this RoPE scaling is not supported")
    return scaling


# --------------------------------------------------------------------------- tensors


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows (per head, it interleaves the two halves
    of the head dim: HF row ``j`` and ``j + d/2`` become rows ``2j`` and ``2j + 1``)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str) -> tuple[str, bool] | None:
    """The Hugging Face name of a GGUF tensor for Hugging Face class ``arch``, and whether
    it is a stacked expert tensor (then the name has a ``{}`` for the expert index);
    ``None`` for a name this family does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name], False
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not match:
        return None
    prefix, rest = f"model.layers.{match[1]}.", match[2]
    mixtral = arch == "MixtralForCausalLM"
    block = "block_sparse_moe." if mixtral else "mlp."
    if rest == "ffn_gate_inp.weight":
        return prefix + block + "gate.weight", False
    if rest in _LAYER_NAMES:
        return prefix + _LAYER_NAMES[rest], False
    stem = rest.removesuffix(".weight")
    if stem in _EXPERT_NAMES:
        return (f"{prefix}{block}experts.{{}}.{_EXPERT_NAMES[stem][0 if mixtral else 1]}"
                ".weight", True)
    if mixtral and (old := _OLD_MIXTRAL_EXPERT.fullmatch(rest)):
        name = {"gate": "w1", "up": "w3", "down": "w2"}[old[1]]
        return f"{prefix}{block}experts.{old[2]}.{name}.weight", False
    return None


def _reshape(path: Path, name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` in the Hugging Face ``shape`` when only unit axes differ (the shared-expert
    gate is ``(d_model,)`` in GGUF and ``(1, d_model)`` in Hugging Face); else an error."""
    if array.size == math.prod(shape) and [n for n in array.shape if n != 1] == [
            n for n in shape if n != 1]:
        return array.reshape(shape)
    raise ValueError(f"{path}: tensor {name} has shape {array.shape} (numpy order), expected "
                     f"{shape} from the metadata")


def load_gguf(path, dtype=jnp.float32, scan_layers: bool = True) -> tuple[Decoder, dict]:
    """Load a GGUF checkpoint: ``(Decoder, params)`` (a
    :class:`~mechinterp.models.decoder.MoEDecoder` for the mixture-of-experts files).

    Quantized tensors are dequantized (float32, exactly llama.cpp's values) and then cast
    to ``dtype``, which is both the compute and the parameter dtype. ``scan_layers`` picks
    the scanned or unrolled parameter layout. Raises ``ValueError`` naming the file and the
    key, tensor or type for an unsupported architecture or tensor type and for a truncated
    or corrupt file.
    """
    path = Path(path)
    meta, tensors = _read(path)
    shapes = {t.name: t.shape for t in tensors}
    hf = hf_config_from_gguf(meta, shapes, path)
    arch = hf["architectures"][0]
    _check_tensor_types(path, tensors)

    scaling = hf.get("rope_scaling")
    if scaling is not None and scaling["rope_type"] == "llama3":
        rope_freqs = next(t for t in tensors if t.name == "rope_freqs.weight")
        hf["rope_scaling"] = _llama3_scaling(
            path, _dequantize(path, rope_freqs), hf["rope_theta"], hf["head_dim"],
            scaling["original_max_position_embeddings"])
    try:
        config = config_from_hf(hf, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    except ValueError as error:
        raise ValueError(f"{path}: {error}".replace("config.json ", "GGUF-derived config ")
                         ) from None
    expected = {t.hf_name: t for t in _tensors(config)}
    permuted = meta["general.architecture"] in PERMUTED_ARCHITECTURES

    unrolled: dict[str, Any] = {}
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name == "rope_freqs.weight":  # read above, into the config
            continue
        named = hf_name(tensor.name, arch)
        if named is None or named[0].format(0) not in expected:
            raise ValueError(f"{path}: unexpected tensor {tensor.name} for {arch} (an "
                             "unsupported feature of this architecture?)")
        name, stacked = named
        value = _dequantize(path, tensor)
        if stacked:  # (experts, out, in)
            parts = [(name.format(j), value[j]) for j in range(value.shape[0])]
        else:
            parts = [(name, value)]
        for full, array in parts:
            if full not in expected:
                raise ValueError(f"{path}: tensor {tensor.name} gives {full}, which {arch} "
                                 "with this config does not have")
            spec = expected[full]
            if permuted and full.endswith(".q_proj.weight"):
                array = _unpermute(array, config.n_heads)
            elif permuted and full.endswith(".k_proj.weight"):
                array = _unpermute(array, config.n_kv_heads)
            if array.shape != spec.hf_shape:
                array = _reshape(path, tensor.name, array, spec.hf_shape)
            _put(unrolled, spec, array, dtype)
            seen.add(full)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: missing tensors (Hugging Face names) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} that {arch} needs")
    return decoder_class(config)(config), _assembled(unrolled, config)


# --------------------------------------------------------------------------- tokenizer


def load_gguf_tokenizer(path) -> GGUFTokenizer:
    """The tokenizer a GGUF file's metadata describes (``tokenizer.ggml.*``), as a
    ``tokenizers.Tokenizer`` plus its special token ids: a :class:`GGUFTokenizer`.

    The vocabulary, merges and pre-tokenizer are converted by transformers' GGUF tokenizer
    conversion (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``), which knows
    llama.cpp's tokenizer kinds (``gpt2`` byte-level BPE with its ``tokenizer.ggml.pre``
    split rules, ``llama`` SentencePiece, ...); transformers is needed here, and only here.
    The returned tokenizer adds no special tokens: prepend ``bos_token_id`` when
    ``add_bos_token`` says the model expects one.
    """
    path = Path(path)
    meta, _ = _read(path)
    missing = [key for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
               if key not in meta]
    if missing:
        raise ValueError(f"{path}: the GGUF metadata has no tokenizer ({missing} missing); "
                         "load the tokenizer of the original model instead")
    try:
        import transformers
    except ImportError as error:
        raise ImportError("load_gguf_tokenizer needs transformers (pip install transformers) "
                          "to convert the GGUF tokenizer") from error
    try:
        fast = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as error:
        raise ValueError(f"{path}: transformers could not convert the GGUF tokenizer "
                         f"(tokenizer.ggml.model={meta['tokenizer.ggml.model']!r}, "
                         f"tokenizer.ggml.pre={meta.get('tokenizer.ggml.pre')!r}): "
                         f"{type(error).__name__}: {error}") from error
    tokenizer = fast.backend_tokenizer
    tokenizer.post_processor = None  # no special tokens added by encode(); see add_bos_token
    model = meta["tokenizer.ggml.model"]
    # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    return GGUFTokenizer(tokenizer, meta.get("tokenizer.ggml.bos_token_id"),
                         meta.get("tokenizer.ggml.eos_token_id"), add_bos,
                         meta.get("tokenizer.chat_template"))
