"""Model families (installed as ``mechinterp.models``).

The LLaMA / Mistral / Qwen2 / Qwen3 decoder family and its mixture-of-experts variants
(Mixtral, Qwen2-MoE, Qwen3-MoE), its generation loop and Hugging Face checkpoint I/O; the
vision families :mod:`.cnn` and :mod:`.vit` (with SLAB blocks, :mod:`.slab`); shared
blocks live in :mod:`mechinterp.models.layers` and :mod:`mechinterp.models.moe`; GGUF
(llama.cpp) files load with :func:`load_gguf` (needs the ``gguf`` package: the ``real`` extra).
"""

from .cnn import CNN
from .decoder import (Decoder, DecoderConfig, KVCache, MoEDecoder, decoder_class, init_cache,
                      stack_layers, unstack_layers)
from .generate import generate
from .gguf import load_gguf, load_gguf_tokenizer
from .hf import load_hf, save_hf
from .moe import MoE
from .vit import ViT

__all__ = [
    "CNN",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "MoE",
    "MoEDecoder",
    "decoder_class",
    "generate",
    "init_cache",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_hf",
    "save_hf",
    "stack_layers",
    "unstack_layers",
    "ViT",
]
