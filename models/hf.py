"""Read and write Hugging Face checkpoints of the decoder family (local folders only).

``load_hf(path)`` reads ``config.json`` plus ``model.safetensors`` (or a sharded index)
with the safetensors readers: no torch, nothing unpickled. ``save_hf(model, params, path)``
writes a folder ``transformers`` loads. Supported: LLaMA 2/3/3.x, Mistral (no sliding
window), Qwen2/2.5, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE; anything else the model would
need raises a ``ValueError`` naming the field. Design notes: docs/real_checkpoints.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from mechinterp import validate

from .decoder import Decoder, DecoderConfig, decoder_class
from .hf_config import config_from_hf, config_to_hf


# Tensors some checkpoints carry that hold no learned state (recomputed from the config).
NON_PERSISTENT_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- tensor layout


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor: its HF name and shape, where it lives in our (unrolled)
    parameter tree, and how to convert it each way."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    # For one expert of a stacked (experts, ...) parameter: its index along that axis.
    expert: int | None = None


def _identity(x):
    return x


def _transpose(x):
    return x.T


def _tensors(config: DecoderConfig) -> list[_Tensor]:
    """Every tensor a Hugging Face checkpoint of ``config`` holds."""
    e, h, kv, d, m = config.d_model, config.n_heads, config.n_kv_heads, config.d_head, config.d_mlp

    def into_heads(heads):  # HF (heads * d, e) <-> ours (e, heads, d)
        return (lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

    def bias(heads):  # HF (heads * d,) <-> ours (heads, d)
        return (lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

    out_of_heads = (lambda w: w.T.reshape(h, d, e), lambda w: w.reshape(h * d, e).T)
    plain, linear = (_identity, _identity), (_transpose, _transpose)

    tensors = [_Tensor("model.embed_tokens.weight", ("embedding",), (config.vocab_size, e),
                       *plain),
               _Tensor("model.norm.weight", ("norm", "scale"), (e,), *plain)]
    if not config.tie_embeddings:
        tensors.append(_Tensor("lm_head.weight", ("lm_head",), (config.vocab_size, e), *linear))
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        layer = [
            ("input_layernorm.weight", ("attn_norm", "scale"), (e,), plain),
            ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (e,), plain),
            ("self_attn.q_proj.weight", ("attn", "wq"), (h * d, e), into_heads(h)),
            ("self_attn.k_proj.weight", ("attn", "wk"), (kv * d, e), into_heads(kv)),
            ("self_attn.v_proj.weight", ("attn", "wv"), (kv * d, e), into_heads(kv)),
            ("self_attn.o_proj.weight", ("attn", "wo"), (e, h * d), out_of_heads),
        ]
        if config.n_experts == 0:
            layer += [
                ("mlp.gate_proj.weight", ("mlp", "gate"), (m, e), linear),
                ("mlp.up_proj.weight", ("mlp", "up"), (m, e), linear),
                ("mlp.down_proj.weight", ("mlp", "down"), (e, m), linear),
            ]
        if config.qkv_bias:
            layer += [
                ("self_attn.q_proj.bias", ("attn", "bq"), (h * d,), bias(h)),
                ("self_attn.k_proj.bias", ("attn", "bk"), (kv * d,), bias(kv)),
                ("self_attn.v_proj.bias", ("attn", "bv"), (kv * d,), bias(kv)),
            ]
        if config.qk_norm:
            layer += [
                ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (d,), plain),
                ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (d,), plain),
            ]
        tensors += [_Tensor(hf + name, (ours, *path), shape, *convert)
                    for name, path, shape, convert in layer]
        if config.n_experts > 0:
            tensors += _moe_tensors(config, hf, ours, linear)
    return tensors


def _moe_tensors(config: DecoderConfig, hf: str, ours: str, linear) -> list[_Tensor]:
    """The MoE tensors of one layer (``hf``: its HF name prefix, ``ours``: its key)."""
    e, m, n = config.d_model, config.d_expert, config.n_experts
    if config.hf_architecture == "MixtralForCausalLM":
        block, names = "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        block, names = "mlp.", ("gate_proj", "up_proj", "down_proj")
    tensors = [_Tensor(hf + block + "gate.weight", (ours, "moe", "router"), (n, e), *linear)]
    for j in range(n):
        for name, param, shape in zip(names, ("gate", "up", "down"), ((m, e), (m, e), (e, m))):
            tensors.append(_Tensor(f"{hf}{block}experts.{j}.{name}.weight",
                                   (ours, "moe", param), shape, *linear, expert=j))
    if config.d_shared_expert > 0:
        s = config.d_shared_expert
        for name, param, shape in (("gate_proj", "shared_gate", (s, e)),
                                   ("up_proj", "shared_up", (s, e)),
                                   ("down_proj", "shared_down", (e, s))):
            tensors.append(_Tensor(f"{hf}{block}shared_expert.{name}.weight",
                                   (ours, "moe", param), shape, *linear))
    if config.shared_expert_gated:
        tensors.append(_Tensor(hf + block + "shared_expert_gate.weight",
                               (ours, "moe", "shared_expert_gate"), (1, e),
                               lambda w: w.reshape(e), lambda w: w.reshape(1, e)))
    return tensors


# --------------------------------------------------------------------------- load / save


def _read_json(file: Path) -> Any:
    """A JSON file's contents; errors name the file and the problem."""
    if not os.access(file, os.R_OK):
        raise PermissionError(f"cannot read {file}: permission denied (it exists)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not UTF-8 text (JSON): {error}") from None


@contextlib.contextmanager
def _safe_open(file: Path, framework: str):
    """``safe_open`` with errors that name the file (permission; a truncated or corrupt
    header)."""
    if not os.access(file, os.R_OK):
        raise PermissionError(f"cannot read {file}: permission denied (it exists)")
    try:
        handle = safe_open(file, framework=framework)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt "
                         f"header?): {error}") from None
    with handle as f:
        yield f


def _untie_if_head_differs(config: DecoderConfig, files: dict[str, Path]) -> DecoderConfig:
    """``tie_word_embeddings: true`` with a distinct ``lm_head.weight`` in the checkpoint:
    transformers 5 does not tie them then (it warns and keeps ``lm_head``); so do we."""
    if not config.tie_embeddings or "lm_head.weight" not in files:
        return config
    if "model.embed_tokens.weight" not in files:
        return config
    arrays = _read(files, ["lm_head.weight", "model.embed_tokens.weight"])
    head, embed = arrays["lm_head.weight"], arrays["model.embed_tokens.weight"]
    if head.shape == embed.shape and np.array_equal(head, embed):
        return config
    warnings.warn("config.json sets tie_word_embeddings=true but the checkpoint's "
                  "lm_head.weight differs from model.embed_tokens.weight; like transformers, "
                  "loading them untied (set tie_word_embeddings=false to silence this)",
                  stacklevel=3)
    return dataclasses.replace(config, tie_embeddings=False)


def load_hf(path, dtype=jnp.float32, scan_layers: bool = True, check_finite: bool = True
            ) -> tuple[Decoder, dict]:
    """Load a local Hugging Face checkpoint folder: ``(Decoder, params)`` (a
    :class:`~mechinterp.models.decoder.MoEDecoder` for the mixture-of-experts architectures,
    a :class:`~mechinterp.models.vit.ViT` for ``ViTForImageClassification``).

    ``dtype`` is both the compute and the parameter dtype (a floating dtype).
    ``scan_layers`` picks the scanned (``layers``) or unrolled (``layers_0``, ...) parameter
    layout. ``check_finite`` (default on; one pass over the weights) raises
    :class:`~mechinterp.validate.NonFiniteError` naming the first tensor holding NaN or inf.
    """
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"load_hf dtype={dtype!r} is not a floating dtype; weights need one "
                        "(jnp.float32, jnp.bfloat16, jnp.float16)")
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {folder}; pass a Hugging Face model folder")
    hf = _read_json(config_file)
    if isinstance(hf, dict) and hf.get("architectures") == ["ViTForImageClassification"]:
        from .vit_hf import load_vit_hf  # imports this module's readers

        return load_vit_hf(folder, hf, dtype, scan_layers, check_finite)
    config = config_from_hf(hf, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    files = _safetensors_files(folder)
    config = _untie_if_head_differs(config, files)
    tensors = _tensors(config)
    _check_names_and_shapes(files, tensors, config, folder)

    arrays = _read(files, [t.hf_name for t in tensors])
    if check_finite:
        validate.check_finite(arrays, f"checkpoint {folder}: tensor")
    unrolled: dict[str, Any] = {}
    for tensor in tensors:
        _put(unrolled, tensor, arrays.pop(tensor.hf_name), dtype)
    return decoder_class(config)(config), _assembled(unrolled, config)


def _put(unrolled: dict, tensor: _Tensor, array, dtype) -> None:
    """Place HF-layout ``array`` into the unrolled params tree at ``tensor.path``, in our
    layout and ``dtype``; an expert slice is collected by its index (see :func:`_assembled`).
    Shared by :func:`load_hf` and :func:`~mechinterp.models.gguf.load_gguf`."""
    node = unrolled
    for key in tensor.path[:-1]:
        node = node.setdefault(key, {})
    value = np.asarray(tensor.to_ours(array), dtype)
    if tensor.expert is None:
        node[tensor.path[-1]] = value
    else:
        node.setdefault(tensor.path[-1], {})[tensor.expert] = value


def _is_experts(node) -> bool:
    return isinstance(node, dict) and bool(node) and all(isinstance(k, int) for k in node)


def _assembled(unrolled: dict, config: DecoderConfig) -> dict:
    """The params tree from one :func:`_put` per tensor: experts stacked by index, layers
    stacked into ``layers`` when ``config.scan_layers``, leaves as JAX arrays."""
    unrolled = jax.tree.map(
        lambda node: np.stack([node[j] for j in sorted(node)]) if _is_experts(node) else node,
        unrolled, is_leaf=_is_experts)
    if config.scan_layers:
        layers = [unrolled.pop(f"layers_{i}") for i in range(config.n_layers)]
        unrolled["layers"] = jax.tree.map(lambda *a: np.stack(a), *layers)
    return jax.tree.map(jnp.asarray, unrolled)


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        contents = _read_json(index)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' (a JSON object from tensor name "
                             f"to shard file); got keys {sorted(contents)[:5] if isinstance(contents, dict) else type(contents).__name__}")
        absent = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if absent:
            raise ValueError(f"{index.name} in {folder} lists shard files that are absent: "
                             f"{absent}")
        return {name: folder / file for name, file in weight_map.items()}
    if single.is_file():
        with _safe_open(single, "numpy") as f:
            return {name: single for name in f.keys()}
    pickled = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in folder.glob(ext))
    if pickled:
        raise ValueError(
            f"{folder} holds only PyTorch pickle weights {pickled}; load_hf reads safetensors "
            "only and never unpickles. Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path) writes "
            "model.safetensors"
        )
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def _check_names_and_shapes(files: dict[str, Path], tensors: list[_Tensor],
                            config: DecoderConfig, folder: Path) -> None:
    expected = {t.hf_name: t for t in tensors}
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ValueError(
            f"checkpoint {folder} is missing tensors {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} that {config.hf_architecture} with this "
            "config.json needs"
        )
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()  # HF ignores it too
    extra = sorted(name for name in set(files) - set(expected) - tied_head
                   if not name.endswith(NON_PERSISTENT_SUFFIXES))
    if extra:
        raise ValueError(
            f"checkpoint {folder} has unexpected tensors {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}; config.json does not use them (is "
            "'architectures' or a bias/norm setting wrong?)"
        )
    for file in sorted(set(files.values())):
        with _safe_open(file, "numpy") as f:
            for name in f.keys():
                if name not in expected:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name].hf_shape:
                    raise ValueError(
                        f"tensor {name} in {file.name} has shape {shape}, expected "
                        f"{expected[name].hf_shape} from config.json"
                    )


def _read(files: dict[str, Path], names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors as host numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``).

    safetensors' ``numpy`` reader cannot represent bfloat16, so this goes through its
    ``flax`` reader, kept on the CPU device; each file is opened once.
    """
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    arrays = {}
    with jax.default_device(jax.devices("cpu")[0]):
        for file, in_file in by_file.items():
            with _safe_open(file, "flax") as f:
                arrays.update((name, np.asarray(f.get_tensor(name))) for name in in_file)
    return arrays


def save_hf(model: Decoder, params, path) -> None:
    """Write ``config.json`` and ``model.safetensors`` (in ``param_dtype``) to folder ``path``.

    ``params`` is the parameter tree in either layout (scanned or unrolled, boxed or not).
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads the result.
    """
    config = model.config
    if config.attn_layers is not None or config.mlp_layers is not None:
        raise ValueError(
            f"this model has dropped sublayers (attn_layers={config.attn_layers}, mlp_layers="
            f"{config.mlp_layers}); Hugging Face formats need every layer to have attention "
            "and an MLP, so it cannot be saved with save_hf (save its params with Orbax, or "
            "drop whole blocks, which gives a plain model with fewer layers)")
    params = dict(nn.meta.unbox(params))
    if "layers" in params:
        layers = params.pop("layers")
        for i in range(config.n_layers):
            params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    dtype = config.param_dtype
    tensors = {}
    for tensor in _tensors(config):
        value = params
        for key in tensor.path:
            value = value[key]
        if tensor.expert is not None:
            value = value[tensor.expert]
        expected = jax.eval_shape(tensor.to_ours,
                                  jax.ShapeDtypeStruct(tensor.hf_shape, dtype)).shape
        if value.shape != expected:
            raise ValueError(f"parameter {'/'.join(tensor.path)} has shape {value.shape}, "
                             f"expected {expected} from the model's config")
        tensors[tensor.hf_name] = np.ascontiguousarray(tensor.to_hf(np.asarray(value, dtype)))
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    safetensors.numpy.save_file(tensors, folder / "model.safetensors",
                                metadata={"format": "pt"})
