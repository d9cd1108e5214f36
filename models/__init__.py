"""Model families (installed as ``mechinterp.models``).

The LLaMA / Mistral / Qwen2 / Qwen3 decoder family, its generation loop and Hugging Face
checkpoint I/O; shared blocks live in :mod:`mechinterp.models.layers`.
"""

from .decoder import (Decoder, DecoderConfig, KVCache, init_cache, stack_layers,
                      unstack_layers)
from .generate import generate
from .hf import load_hf, save_hf

__all__ = [
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "generate",
    "init_cache",
    "load_hf",
    "save_hf",
    "stack_layers",
    "unstack_layers",
]
