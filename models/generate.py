"""Autoregressive generation with a KV cache: one jitted prefill plus a ``lax.scan`` decode.

Works with any module whose call is ``model.apply({'params': p}, tokens, attention_mask,
cache=cache) -> (logits, new_cache)`` and whose ``config`` can size a :class:`KVCache`
through :func:`init_cache` (the :class:`Decoder` family).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import validate

from .decoder import init_cache


def generate(model: nn.Module, params, tokens, attention_mask=None, max_new_tokens: int = 32,
             temperature: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Extend ``tokens`` (batch, pos) by ``max_new_tokens`` tokens; returns (batch, pos + new).

    ``attention_mask`` (batch, pos) marks real tokens with 1; padding must be on the left so
    that every row's last prompt token is real. ``temperature == 0`` picks the argmax
    (greedy); ``temperature > 0`` samples from ``softmax(logits / temperature)`` with
    ``rng``. Generation never stops early (no end-of-sequence handling).
    """
    validate.check_model_inputs(model, (tokens, attention_mask), {})
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, pos), got shape {tokens.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    elif not isinstance(attention_mask, jax.core.Tracer):
        if not np.asarray(attention_mask)[:, -1].all():
            raise ValueError(
                "generate needs left padding: the last prompt token of every row must be "
                "real (attention_mask[:, -1] == 1); pad prompts on the left"
            )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    return _generate(model, params, tokens, jnp.asarray(attention_mask, bool), rng,
                     jnp.float32(temperature), max_new_tokens=max_new_tokens, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(model, params, tokens, attention_mask, rng, temperature, *, max_new_tokens,
              greedy):
    batch, length = tokens.shape
    cache = init_cache(model.config, batch, length + max_new_tokens - 1)
    variables = {"params": params}

    def pick(logits, key):
        logits = logits.astype(jnp.float32)
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    def step(carry, key):
        cache, token = carry
        logits, cache = model.apply(variables, token[:, None], cache=cache)
        following = pick(logits[:, -1], key)
        return (cache, following), following

    keys = jax.random.split(rng, max_new_tokens)
    logits, cache = model.apply(variables, tokens, attention_mask, cache=cache)
    first = pick(logits[:, -1], keys[0])
    _, rest = jax.lax.scan(step, (cache, first), keys[1:])
    return jnp.concatenate([tokens, first[:, None], rest.T], axis=1)
