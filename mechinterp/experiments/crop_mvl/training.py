"""Many small multi-view classifiers trained in one compiled call.

``fit_runs`` trains one fusion model per run (a run = a label budget x a training seed) with
``vmap`` over runs and ``lax.scan`` over Adam steps, so a grid cell compiles once. Unlike
``kit.classifier.Classifier`` (one network per Python loop of jitted steps, a fixed
cross-entropy), the objective is the model's own ``sum_h w_h CE(head_h)`` (``heads=True``
of :mod:`mechinterp.models.fusion`), which ensemble and hybrid fusion need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def fit_runs(model, views, labels, counts, seeds, *, steps: int, batch_size: int,
             learning_rate: float):
    """``(params, losses (run, step))``: run ``r`` trains on the first ``counts[r]`` fields
    of ``views[v][r]`` / ``labels[r]`` (padded to one length), minibatches drawn with
    replacement, initialised and shuffled from ``seeds[r]``."""
    tx = optax.adam(learning_rate)

    def loss(params, xb, yb):
        heads, weights = model.apply({"params": params}, *xb, heads=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(
            heads, jnp.broadcast_to(yb, heads.shape[:2]))
        return jnp.sum(jnp.asarray(weights) * ce.mean(1))

    def one(params, views, labels, count, seed):
        data_key = jax.random.split(jax.random.key(seed))[1]

        def step(carry, key):
            params, opt_state = carry
            idx = jax.random.randint(key, (batch_size,), 0, count)
            value, grads = jax.value_and_grad(loss)(params, [v[idx] for v in views],
                                                    labels[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                           jax.random.split(data_key, steps))
        return params, losses

    # init one run at a time: the recurrent cells' orthogonal init is a QR, and a batched
    # QR under vmap deadlocked jaxlib's CPU thread pool here (seen with gdb)
    init = jax.jit(model.init)
    params = [init(jax.random.split(jax.random.key(s))[0], *[v[r, :1] for v in views])["params"]
              for r, s in enumerate(seeds)]
    params = jax.tree.map(lambda *p: jnp.stack(p), *params)
    return jax.jit(jax.vmap(one))(params, views, labels, jnp.asarray(counts),
                                  jnp.asarray(seeds))


def predict_runs(model, params, views) -> np.ndarray:
    """Predicted classes ``(run, field)`` of every run's model on the shared ``views``."""
    logits = jax.jit(jax.vmap(lambda p: model.apply({"params": p}, *views)))(params)
    return np.asarray(logits.argmax(-1))

