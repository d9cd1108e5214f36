"""Autoregressive generation with a KV cache: one jitted prefill plus a ``lax.scan`` decode.

Works with any module whose call is ``model.apply({'params': p}, tokens, attention_mask,
cache=cache) -> (logits, new_cache)`` and whose ``config`` can size a :class:`KVCache`
through :func:`init_cache` (the :class:`Decoder` family). Sampling: greedy, temperature,
top-k, top-p (:func:`sample`). Interventions (``{site: Intervention}``, as for
``mechinterp.intervene`` on the prompt) apply in the prefill and at every decode step, cut
to the positions each forward sees (:mod:`.generate_interventions`), so the result equals
rerunning the whole intervened forward at every step.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import validate
from mechinterp.site_io import intervention_variables

from . import generate_interventions
from .decoder import init_cache


def generate(model: nn.Module, params, tokens, attention_mask=None, max_new_tokens: int = 32,
             temperature: float = 0.0, rng: jax.Array | None = None,
             top_k: int | None = None, top_p: float | None = None,
             interventions=None) -> jax.Array:
    """Extend ``tokens`` (batch, pos) by ``max_new_tokens`` tokens; returns (batch, pos + new).

    ``attention_mask`` (batch, pos) marks real tokens with 1; padding must be on the left so
    that every row's last prompt token is real. ``temperature == 0`` picks the argmax
    (greedy); ``temperature > 0`` samples from ``softmax(logits / temperature)`` with
    ``rng``, keeping only the ``top_k`` most likely tokens and/or the smallest set whose
    probability reaches ``top_p`` (both need ``temperature > 0``). Generation never stops
    early (no end-of-sequence handling).

    ``interventions``: ``{site name: Intervention}`` shaped as for
    ``mechinterp.intervene(model, params, tokens, attention_mask, ...)``. A field of size 1
    along the position axes applies at every position, generated ones included (steering,
    ablating a head); a field sized to the prompt along ``pos`` applies at those prompt
    positions only (a patch). Equal token for token to rerunning the full intervened
    forward at each step without a cache.
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
    check_sampling(greedy, top_k, top_p, model.config.vocab_size)
    extended, layout = generate_interventions.extend(
        model, tokens, attention_mask, interventions or {},
        tokens.shape[1] + max_new_tokens - 1)
    return _generate(model, params, tokens, jnp.asarray(attention_mask, bool), rng,
                     jnp.float32(temperature), extended, max_new_tokens=max_new_tokens,
                     greedy=greedy, top_k=top_k, top_p=top_p, layout=layout)


def check_sampling(greedy: bool, top_k: int | None, top_p: float | None, vocab: int) -> None:
    """Errors for ``top_k`` / ``top_p`` values :func:`sample` cannot use."""
    if greedy and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p restrict sampling: they need temperature > 0 "
                         "(temperature 0 is greedy decoding)")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be an int in [1, {vocab}], got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits, key, temperature, greedy: bool, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Next tokens (batch,) from logits (batch, vocab): the argmax when ``greedy``, else a
    draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits
    and then to the smallest most-likely set of probability ``>= top_p`` (the top token is
    always kept)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
        rows = jnp.arange(logits.shape[0])[:, None]
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k",
                                             "top_p", "layout"))
def _generate(model, params, tokens, attention_mask, rng, temperature, extended, *,
              max_new_tokens, greedy, top_k, top_p, layout):
    batch, length = tokens.shape
    cache = init_cache(model.config, batch, length + max_new_tokens - 1)

    def pick(logits, key):
        return sample(logits, key, temperature, greedy, top_k, top_p)

    def apply(inputs, cache, start):
        """One cached forward of ``inputs`` (tokens and mask) at sequence slot ``start``,
        under the interventions cut to its positions."""
        variables = {"params": params}
        if layout:
            edits = generate_interventions.at(extended, layout, start, inputs[0].shape[1],
                                              cache.max_len)
            variables.update(intervention_variables(model, *inputs, cache=cache,
                                                    interventions=edits)[0])
        return model.apply(variables, *inputs, cache=cache)

    def step(carry, key):
        cache, token = carry
        logits, cache = apply((token[:, None],), cache, cache.index)
        following = pick(logits[:, -1], key)
        return (cache, following), following

    keys = jax.random.split(rng, max_new_tokens)
    logits, cache = apply((tokens, attention_mask), cache, 0)
    first = pick(logits[:, -1], keys[0])
    _, rest = jax.lax.scan(step, (cache, first), keys[1:])
    return jnp.concatenate([tokens, first[:, None], rest.T], axis=1)
