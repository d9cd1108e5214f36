"""Small regression models (forecasters) trained with one compiled Adam step.

``Regressor(model, inputs=("values", "times"), target="targets", loss="huber", ...)``
trains any linen module ``apply(variables, *batch[inputs]) -> predictions`` on a dict of
arrays, adding the auxiliary losses the model sows (``mechinterp.models.moe.AUX_LOSS``).
Like :class:`~mechinterp.experiments.kit.classifier.Classifier`, for many small networks
where ``train_or_reuse``'s per-network checkpoints would cost more than the training.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.models.moe import AUX_LOSS

LOSSES = ("huber", "mse")


def point_loss(pred, target, kind: str, delta: float = 1.0):
    """Mean Huber (``delta``) or squared error."""
    if kind == "huber":
        return optax.huber_loss(pred, target, delta=delta).mean()
    return jnp.mean((pred - target) ** 2)


class Regressor:
    """See the module docstring; ``warmup``: linear warm-up steps of a cosine schedule;
    ``fast_compile``: XLA's unoptimised CPU compile (for runs of a few steps)."""

    def __init__(self, model, *, inputs: Sequence[str], target: str, steps: int,
                 batch_size: int, learning_rate: float, loss: str = "mse", warmup: int = 50,
                 fast_compile: bool = False):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not supported; supported: {LOSSES}")
        self.model, self.inputs, self.target = model, tuple(inputs), target
        self.steps, self.batch_size = steps, batch_size
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                      min(warmup, max(steps - 1, 1)),
                                                      max(steps, 2))
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 1e-4))

        def total(params, batch):
            pred, state = model.apply({"params": params}, *[batch[k] for k in self.inputs],
                                      mutable=[AUX_LOSS])
            fit = point_loss(pred, batch[self.target], loss)
            aux = sum(jnp.sum(x) for x in jax.tree.leaves(state.get(AUX_LOSS, {})))
            return fit + aux, fit

        def step(params, opt_state, batch):
            (_, fit), grads = jax.value_and_grad(total, has_aux=True)(params, batch)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, fit

        options = FAST_COMPILE if fast_compile else None
        self._step = jax.jit(step, compiler_options=options)
        self._predict = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs),
                                compiler_options=options)
        self._init = jax.jit(model.init, compiler_options=FAST_COMPILE)

    def init(self, seed: int, data: dict):
        return self._init(jax.random.key(seed), *[data[k][:1] for k in self.inputs])["params"]

    def fit(self, params, data: dict, seed: int) -> tuple[dict, np.ndarray]:
        """``(params, losses)`` after ``steps`` steps on shuffled batches of ``data``."""
        opt_state = self.tx.init(params)
        rng = np.random.default_rng(seed)
        n = len(data[self.target])
        order, losses = np.zeros(0, int), []
        for _ in range(self.steps):
            if len(order) < self.batch_size:
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = order[:self.batch_size], order[self.batch_size:]
            params, opt_state, value = self._step(params, opt_state,
                                                  {k: v[idx] for k, v in data.items()})
            losses.append(value)
        return params, np.asarray(jnp.stack(losses)) if losses else np.zeros(0)

    def predict(self, params, data: dict, batch: int = 512) -> np.ndarray:
        n = len(data[self.target])
        return np.concatenate([np.asarray(self._predict(
            params, *[data[k][i:i + batch] for k in self.inputs])) for i in range(0, n, batch)])
