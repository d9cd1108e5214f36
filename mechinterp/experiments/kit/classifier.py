"""Small classifiers trained many times over with one compiled step.

``Classifier(model, steps=..., batch_size=..., learning_rate=...)`` compiles one Adam step
for ``model`` (any linen classifier ``apply(variables, x, **kwargs) -> logits``) and
reuses it for every network of a run: frozen top-level parameter entries are a 0/1 mask
argument (on gradients and updates, so they stay bit-identical), BatchNorm running
statistics (a ``batch_stats`` collection) are updated in training, and ``schedule(step)``
may feed array keyword arguments per step (e.g. PRepBN's ``norm_lambda``). Experiments that
train hundreds of 10k-parameter networks use it instead of ``train_or_reuse`` (which
compiles and checkpoints per network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

STATS = "batch_stats"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Classifier:
    """See the module docstring. ``train_kwargs``: static keyword arguments of training
    applies (e.g. ``{"train": True}``); ``schedule(step) -> {name: value}``: per-step array
    keyword arguments of training applies (evaluation uses the model's defaults)."""

    def __init__(self, model, *, steps: int, batch_size: int, learning_rate: float,
                 train_kwargs: Mapping[str, Any] | None = None,
                 schedule: Callable[[int], dict] | None = None):
        self.model, self.steps, self.batch_size = model, steps, batch_size
        self.learning_rate = learning_rate
        self.schedule = schedule or (lambda step: {})
        self.tx = optax.adam(learning_rate)
        static = dict(train_kwargs or {})

        def loss(params, stats, x, y, dynamic):
            logits, updates = model.apply({"params": params, **stats}, x, mutable=[STATS],
                                          **static, **dynamic)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, updates

        def step(variables, opt_state, x, y, mask, dynamic):
            params = variables["params"]
            stats = {k: v for k, v in variables.items() if k != "params"}
            (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(
                params, stats, x, y, dynamic)
            grads = jax.tree.map(jnp.multiply, grads, mask)
            steps, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(jnp.multiply, steps, mask))
            return {"params": params, **stats, **updates}, opt_state, value

        self._step = jax.jit(step)
        self._logits = jax.jit(model.apply)
        # init runs once per network, and XLA's optimizing CPU compile of its random
        # initializers takes seconds (~10 s for one attention layer's, 2-3 s unoptimized)
        self._init = jax.jit(model.init, compiler_options=FAST_COMPILE)

    def init(self, seed: int, x) -> dict:
        """Fresh variables (``params`` and, with BatchNorm, ``batch_stats``)."""
        return dict(self._init(jax.random.key(seed), x[:1]))

    def fit(self, variables: dict, x, y, seed: int, frozen=()) -> tuple[dict, np.ndarray]:
        """``(variables, losses)`` after ``steps`` Adam steps on shuffled batches of
        ``(x, y)``; top-level parameter entries named in ``frozen`` are held fixed."""
        params = variables["params"]
        mask = {k: jax.tree.map(lambda _, k=k: jnp.float32(k not in frozen), v)
                for k, v in params.items()}
        opt_state = self.tx.init(params)
        rng = np.random.default_rng(seed)
        order, losses = np.zeros(0, int), []
        for step in range(self.steps):
            if len(order) < self.batch_size:
                order = np.concatenate([order, rng.permutation(len(x))])
            idx, order = order[:self.batch_size], order[self.batch_size:]
            dynamic = {k: jnp.asarray(v, jnp.float32) for k, v in self.schedule(step).items()}
            variables, opt_state, loss = self._step(variables, opt_state, x[idx], y[idx], mask,
                                                    dynamic)
            losses.append(loss)
        return variables, np.asarray(jnp.stack(losses)) if losses else np.zeros(0)

    def logits(self, variables: dict, x) -> jax.Array:
        return self._logits(variables, x)

    def accuracy(self, variables: dict, x, y) -> float:
        return float(np.mean(np.asarray(self.logits(variables, x)).argmax(-1) == y))
