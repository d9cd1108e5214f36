"""One compiled call trains a model once per training seed, for any loss.

:func:`fit_seeds` runs ``steps`` Adam steps (cosine-decayed learning rate) with
``lax.scan`` inside ``lax.map`` over seeds: one compilation for every seed, minibatches drawn
with replacement from the seed's own key. ``shared`` arrays (inputs, labels) are the same
for every seed; ``per_seed`` arrays (e.g. each seed's teacher outputs) carry a leading
seed axis. :func:`init_seeds` stacks one initialisation per seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mechinterp.experiments.kit.classifier import FAST_COMPILE


def init_seeds(init: Callable, seeds: Sequence[int], *example) -> dict:
    """``init(key, *example)`` for every seed, stacked on a leading seed axis."""
    keys = jnp.stack([jax.random.split(jax.random.key(s))[0] for s in seeds])
    return jax.jit(jax.vmap(lambda k: init(k, *example)), compiler_options=FAST_COMPILE)(keys)


def fit_seeds(loss: Callable, params, shared: Mapping[str, jax.Array],
              per_seed: Mapping[str, jax.Array], seeds: Sequence[int], *, steps: int,
              batch_size: int, learning_rate: float):
    """``(params, losses (seed, step))``: ``loss(params, batch)`` minimized from ``params``
    (stacked over seeds) where ``batch`` holds the same ``batch_size`` rows of every
    array in ``shared`` and in the seed's slice of ``per_seed``."""
    n = len(next(iter(shared.values())))
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def one(params, shared, per_seed, seed):
        def step(carry, key):
            params, opt_state = carry
            idx = jax.random.randint(key, (batch_size,), 0, n)
            batch = {k: v[idx] for k, v in (*shared.items(), *per_seed.items())}
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        keys = jax.random.split(jax.random.split(jax.random.key(seed))[1], steps)
        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
        return params, losses

    # seeds one after another (lax.map), not vmap: a vmapped convolution with per-seed
    # kernels is a grouped convolution, about 2.7x slower per seed on XLA's CPU backend
    fit = jax.jit(lambda params, shared, per_seed, seeds: jax.lax.map(
        lambda a: one(a[0], shared, a[1], a[2]), (params, per_seed, seeds)))
    return fit(params, dict(shared), dict(per_seed), jnp.asarray(seeds))
