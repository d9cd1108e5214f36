"""FLOP counts and model FLOPs utilization (MFU).

Training FLOPs per token follow the PaLM appendix-B convention: ``6 * N`` for the
parameter matmuls (forward 2N, backward 4N), where ``N`` counts the matrices a token is
multiplied by (attention and MLP weights of every layer, and the output projection; not
the embedding lookup or norm scales), plus ``12 * n_layers * n_heads * d_head * seq_len``
for the attention scores and weighted values (full, not halved for causality). MFU is
achieved model FLOPs per second over the devices' peak (dense bfloat16).
"""

from __future__ import annotations

import jax

# Dense bfloat16 peak FLOP/s per device, matched against ``device.device_kind``
# (checked in order, so more specific names come first).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def decoder_matmul_params(config) -> int:
    """``N``: weights each token is multiplied by, for a ``DecoderConfig``-like config
    (fields ``vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp``)."""
    c = config
    attention = c.d_model * c.d_head * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp = 3 * c.d_model * c.d_mlp
    return c.n_layers * (attention + mlp) + c.d_model * c.vocab_size


def decoder_train_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 * n_layers * n_heads * d_head * seq_len``."""
    c = config
    return 6.0 * decoder_matmul_params(c) + 12.0 * c.n_layers * c.n_heads * c.d_head * seq_len


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (default: the first), or None if unknown."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def mfu(flops: float, seconds: float, n_devices: int, peak_per_device: float | None
        ) -> float | None:
    """Model FLOPs utilization of ``flops`` done in ``seconds`` on ``n_devices``."""
    if not peak_per_device or seconds <= 0:
        return None
    return flops / seconds / (n_devices * peak_per_device)


def xla_flops(fn, *args, **kwargs) -> float:
    """FLOPs of ``fn(*args, **kwargs)`` by XLA's cost analysis of the compiled program
    (arrays or ``jax.ShapeDtypeStruct``; nothing runs). Counts every op XLA does
    (convolutions and elementwise work too), but a loop body only once: unroll loops."""
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    return float((compiled.cost_analysis() or {}).get("flops", 0.0))
