"""Hugging Face ``ViTForImageClassification`` checkpoints -> :class:`~mechinterp.models.vit.ViT`.

:func:`mechinterp.models.load_hf` dispatches here on ``architectures``. Reads safetensors
(the tensor names transformers writes: ``vit.encoder.layer.N.attention.attention.query``,
...), checks every name and shape against ``config.json`` first, and returns ``(ViT,
params)`` with the class token pooled, LayerNorm at ``layer_norm_eps`` and exact GELU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import validate

from .hf import _read, _safetensors_files
from .vit import ViT

ARCHITECTURE = "ViTForImageClassification"
_REQUIRED = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
             "num_attention_heads", "intermediate_size")


def vit_from_hf(hf: dict[str, Any], scan_layers: bool = True) -> tuple[ViT, int]:
    """``(ViT, num_channels)`` for a ``ViTForImageClassification`` config.json dict."""
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{ARCHITECTURE} config.json lacks {missing}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{ARCHITECTURE} hidden_act={hf['hidden_act']!r} is not supported; "
                         "only 'gelu' (exact, as in every released ViT)")
    n_labels = len(hf["id2label"]) if "id2label" in hf else int(hf.get("num_labels", 2))
    model = ViT(image_size=int(hf["image_size"]), patch_size=int(hf["patch_size"]),
                d_model=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
                n_heads=int(hf["num_attention_heads"]), d_mlp=int(hf["intermediate_size"]),
                n_classes=n_labels, pool="cls", norm="layer",
                norm_eps=float(hf.get("layer_norm_eps", 1e-12)), scan_layers=scan_layers)
    return model, int(hf["num_channels"])


def _expected_shapes(model: ViT, channels: int, qkv_bias: bool) -> dict[str, tuple]:
    d, p, m = model.d_model, model.patch_size, model.d_mlp
    shapes = {"vit.embeddings.cls_token": (1, 1, d),
              "vit.embeddings.position_embeddings": (1, (model.image_size // p) ** 2 + 1, d),
              "vit.embeddings.patch_embeddings.projection.weight": (d, channels, p, p),
              "vit.embeddings.patch_embeddings.projection.bias": (d,),
              "vit.layernorm.weight": (d,), "vit.layernorm.bias": (d,),
              "classifier.weight": (model.n_classes, d), "classifier.bias": (model.n_classes,)}
    for i in range(model.n_layers):
        pre = f"vit.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{pre}attention.attention.{name}.weight"] = (d, d)
            if qkv_bias:
                shapes[f"{pre}attention.attention.{name}.bias"] = (d,)
        shapes.update({f"{pre}attention.output.dense.weight": (d, d),
                       f"{pre}attention.output.dense.bias": (d,),
                       f"{pre}intermediate.dense.weight": (m, d),
                       f"{pre}intermediate.dense.bias": (m,),
                       f"{pre}output.dense.weight": (d, m), f"{pre}output.dense.bias": (d,)})
        for norm in ("layernorm_before", "layernorm_after"):
            shapes[f"{pre}{norm}.weight"] = (d,)
            shapes[f"{pre}{norm}.bias"] = (d,)
    return shapes


def _check(files: dict[str, Path], shapes: dict[str, tuple], arrays, folder: Path) -> None:
    missing = sorted(set(shapes) - set(files))
    extra = sorted(set(files) - set(shapes))
    if missing or extra:
        raise ValueError(f"checkpoint {folder} does not match its config.json as a "
                         f"{ARCHITECTURE}: missing tensors {missing[:5]}, unexpected tensors "
                         f"{extra[:5]}")
    for name, shape in shapes.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(arrays[name].shape)}, expected "
                             f"{shape} from config.json")


def _block(arrays: dict[str, np.ndarray], i: int, model: ViT) -> dict:
    pre = f"vit.encoder.layer.{i}."
    d, h = model.d_model, model.n_heads

    def get(name):
        return arrays[pre + name]

    attn = {}
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        attn[f"w{ours}"] = get(f"attention.attention.{theirs}.weight").T.reshape(d, h, d // h)
        bias = arrays.get(f"{pre}attention.attention.{theirs}.bias", np.zeros(d, np.float32))
        attn[f"b{ours}"] = bias.reshape(h, d // h)
    attn["wo"] = get("attention.output.dense.weight").T.reshape(h, d // h, d)
    return {"norm1": {"scale": get("layernorm_before.weight"),
                      "bias": get("layernorm_before.bias")},
            "attn": attn, "attn_out_bias": get("attention.output.dense.bias"),
            "norm2": {"scale": get("layernorm_after.weight"), "bias": get("layernorm_after.bias")},
            "mlp": {"up": get("intermediate.dense.weight").T,
                    "up_bias": get("intermediate.dense.bias"),
                    "down": get("output.dense.weight").T, "down_bias": get("output.dense.bias")}}


def load_vit_hf(folder: Path, hf: dict[str, Any], dtype=jnp.float32, scan_layers: bool = True,
                check_finite: bool = True) -> tuple[ViT, dict]:
    """``(ViT, params)`` from a ``ViTForImageClassification`` folder (see module docstring);
    ``dtype`` is the parameter dtype (the forward computes in float32)."""
    model, channels = vit_from_hf(hf, scan_layers)
    files = _safetensors_files(folder)
    shapes = _expected_shapes(model, channels, bool(hf.get("qkv_bias", True)))
    arrays = _read(files, sorted(set(files) & set(shapes)))
    _check(files, shapes, arrays, folder)
    if check_finite:
        validate.check_finite(arrays, f"checkpoint {folder}: tensor")
    emb = "vit.embeddings."
    params = {
        "patch_embed": {"kernel": arrays[emb + "patch_embeddings.projection.weight"].transpose(
            2, 3, 1, 0), "bias": arrays[emb + "patch_embeddings.projection.bias"]},
        "cls_token": arrays[emb + "cls_token"], "pos_embed": arrays[emb + "position_embeddings"],
        "norm": {"scale": arrays["vit.layernorm.weight"], "bias": arrays["vit.layernorm.bias"]},
        "head": {"kernel": arrays["classifier.weight"].T, "bias": arrays["classifier.bias"]},
    }
    blocks = [_block(arrays, i, model) for i in range(model.n_layers)]
    if scan_layers:
        params["layers"] = jax.tree.map(lambda *a: np.stack(a), *blocks)
    else:
        params.update({f"layers_{i}": block for i, block in enumerate(blocks)})
    return model, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
