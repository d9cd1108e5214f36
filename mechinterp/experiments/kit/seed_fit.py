"""One compiled step trains a model once per training seed, for any loss.

:func:`fit_seeds` runs ``steps`` Adam steps (cosine-decayed learning rate) of one compiled
step in a Python loop, seed after seed: one compilation for every seed, minibatches drawn
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

    @jax.jit
    def step(params, opt_state, shared, per_seed, key):
        idx = jax.random.randint(key, (batch_size,), 0, n)
        batch = {k: v[idx] for k, v in (*shared.items(), *per_seed.items())}
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    # a Python loop of one compiled step, seed after seed: on XLA's CPU backend a SegFormer
    # step is ~13x slower inside lax.scan, and ~2x per seed under a vmap over seeds (per-seed
    # conv kernels become grouped convolutions): benchmarks/conv_step_in_scan.py
    trained, losses = [], []
    for r, seed in enumerate(seeds):
        params_r = jax.tree.map(lambda a: a[r], params)
        per_seed_r = {k: v[r] for k, v in per_seed.items()}
        opt_state, values = tx.init(params_r), []
        for key in jax.random.split(jax.random.split(jax.random.key(seed))[1], steps):
            params_r, opt_state, value = step(params_r, opt_state, shared, per_seed_r, key)
            values.append(value)
        trained.append(params_r)
        losses.append(jnp.stack(values))
    return jax.tree.map(lambda *a: jnp.stack(a), *trained), jnp.stack(losses)
