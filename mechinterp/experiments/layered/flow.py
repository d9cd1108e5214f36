"""Flow-matching training of a small DiT for the layered reproductions: one compiled Adam
step (:func:`make_step`) reused for every seed, :func:`train` (random batches; the
conditioning of each batch from a callback) and :func:`seed_runs` (train and sample per seed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.models.diffusion import flow_loss


def make_step(model, learning_rate: float):
    """``(tx, step)``: ``step(params, opt_state, key, images, kwargs) -> (params, opt_state,
    loss)``, the rectified-flow loss of :func:`mechinterp.models.diffusion.flow_loss` at
    uniform times with ``kwargs`` (conditioning arrays) passed to the model."""
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, key, images, kwargs):
        k1, k2 = jax.random.split(key)
        noise = jax.random.normal(k1, images.shape)
        times = jax.random.uniform(k2, (images.shape[0],))
        value, grads = jax.value_and_grad(
            lambda p: flow_loss(model, p, images, noise, times, **kwargs))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return tx, step


def train(model, stepper, images, conditioning, *, steps: int, batch_size: int, seed: int):
    """``(params, losses)`` after ``steps`` steps on random batches of ``images`` (n, H, W,
    C); ``conditioning(idx, rng) -> {kwarg: array}`` for the batch's indices."""
    tx, step = stepper
    rng = np.random.default_rng(seed)
    example = conditioning(np.arange(1), rng)
    params = jax.jit(lambda k, x, kw: model.init(k, x, jnp.ones(1), **kw),
                     compiler_options=FAST_COMPILE)(jax.random.key(seed), images[:1],
                                                    example)["params"]
    opt_state, key, losses = tx.init(params), jax.random.key(seed + 1), []
    for i in range(steps):
        idx = rng.choice(len(images), batch_size)
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i),
                                       images[idx], conditioning(idx, rng))
        losses.append(loss)
    return params, np.asarray(jnp.stack(losses))


def seed_runs(r, config, train_seed, analyse):
    """Per training seed: ``params, curve = train_seed(seed)`` (phase "train"), then
    ``result, samples = analyse(params)`` (phase "sample"). Returns the per-seed results,
    the stacked loss curves (seeds, steps) and the first seed's samples (for figures)."""
    runs, curves, first = [], [], None
    for seed in kit.train_seeds(config):
        with r.phase("train"):
            params, curve = train_seed(seed)
        with r.phase("sample"):
            result, samples = analyse(params)
        runs.append(result)
        curves.append(curve)
        if first is None:
            first = samples
    return runs, np.stack(curves), first
