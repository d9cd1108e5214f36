"""Training a field from renders (scratch) and PVD-AL distillation from a teacher field.

One compiled Adam step per (student, teacher) pair with the stage weights as arguments:
``w_feature * MSE(feature) + w_point * (MSE(log1p density) + MSE(colour)) + w_render *
MSE(render)`` on the sample points of a batch of rays; from scratch only the render term
against the ground-truth renders. PVD-AL's stages switch the weights (features, then
density/colour, then renders with density/colour kept); active learning draws half of
each batch of rays in proportion to their last seen loss (hard samples), half uniformly.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments.pvd_al import scene as sc
from mechinterp.sites import INTERMEDIATES

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _outputs(model, params, pts):
    values, state = model.apply({"params": params}, pts, mutable=[INTERMEDIATES])
    return values, state[INTERMEDIATES]["feature"]


def _pointwise(model, params, angles, offsets, n_samples):
    pts, inside = sc.ray_points(angles, offsets, n_samples)
    values, feature = _outputs(model, params, pts.reshape(-1, 2))
    values = values.reshape(*pts.shape[:2], -1)
    return values, feature.reshape(*pts.shape[:2], -1), inside


class Trainer:
    """Adam on ``student`` (a :class:`~mechinterp.models.fields.Field`), from renders
    (``teacher=None``) or distilled from ``teacher``. ``step`` returns per-ray losses."""

    def __init__(self, student, teacher, *, n_samples: int, learning_rate: float):
        self.student, self.teacher, self.n_samples = student, teacher, n_samples
        self.tx = optax.adam(learning_rate)
        self._init = jax.jit(student.init, compiler_options=FAST_COMPILE)

        def loss(params, t_params, angles, offsets, target, weights):
            values, feat, inside = _pointwise(student, params, angles, offsets, n_samples)
            rendered = sc.composite(values, inside, n_samples)
            if teacher is None:
                per_ray = ((rendered - target) ** 2).mean(-1)
                return per_ray.mean(), per_ray
            t_values, t_feat, _ = _pointwise(teacher, t_params, angles, offsets, n_samples)
            t_values, t_feat = jax.lax.stop_gradient((t_values, t_feat))
            t_render = sc.composite(t_values, inside, n_samples)
            m = inside[..., None]
            point = (((jnp.log1p(values[..., :1]) - jnp.log1p(t_values[..., :1])) ** 2
                      + (values[..., 1:] - t_values[..., 1:]) ** 2 * t_values[..., :1].clip(
                          0, 1)) * m).mean((1, 2))
            per_ray = (weights[0] * ((feat - t_feat) ** 2 * m).mean((1, 2))
                       + weights[1] * point
                       + weights[2] * ((rendered - t_render) ** 2).mean(-1))
            return per_ray.mean(), per_ray

        def step(params, opt_state, t_params, angles, offsets, target, weights):
            (_, per_ray), grads = jax.value_and_grad(loss, has_aux=True)(
                params, t_params, angles, offsets, target, weights)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, per_ray

        self._step = jax.jit(step)
        self._render = jax.jit(functools.partial(self.render_fn, n_samples=n_samples))

    def render_fn(self, params, angles, offsets, n_samples):
        return sc.render(lambda p: self.student.apply({"params": params}, p), angles,
                         offsets, n_samples)

    def init(self, seed: int) -> dict:
        return self._init(jax.random.key(seed), jnp.zeros((1, 2)))["params"]

    def render(self, params, rays) -> np.ndarray:
        return np.asarray(self._render(params, *rays))

    def seconds_per_step(self, params, t_params, rays, target, batch: int,
                         repeats: int = 20) -> float:
        """Process seconds of one step (after compiling), for equal-time budgets."""
        args = self._batch(rays, target, np.arange(batch))
        opt = self.tx.init(params)
        w = jnp.ones(3)
        jax.block_until_ready(self._step(params, opt, t_params, *args, w))
        start = time.process_time()
        for _ in range(repeats):
            jax.block_until_ready(self._step(params, opt, t_params, *args, w))
        return (time.process_time() - start) / repeats

    @staticmethod
    def _batch(rays, target, idx):
        return (jnp.asarray(rays[0][idx]), jnp.asarray(rays[1][idx]),
                jnp.asarray(target[idx]) if target is not None else jnp.zeros((len(idx), 1)))

    def fit(self, params, rays, target, *, steps: int, batch: int, seed: int,
            t_params=None, stages=(0.0, 0.0), active: bool = False, eval_fn=None,
            eval_every: int = 0):
        """Train ``steps`` steps on batches of ``rays`` (angles, offsets); ``stages``:
        fractions of the steps with the feature and then the density/colour loss only
        (distillation; the rest adds the render loss; ``None``: render loss only). Returns (params, curve), the curve
        ``[(step, eval_fn(params)), ...]``."""
        rng = np.random.default_rng(seed)
        opt = self.tx.init(params)
        n = len(rays[0])
        scores = np.ones(n)
        curve = []
        for i in range(steps):
            frac = i / max(steps, 1)
            if self.teacher is None or stages is None:  # from scratch / render-only
                w = (0.0, 0.0, 1.0)
            else:
                w = ((1.0, 0.0, 0.0) if frac < stages[0] else (0.0, 1.0, 0.0)
                     if frac < stages[0] + stages[1] else (0.0, 1.0, 1.0))
            if active:
                hard = rng.choice(n, batch // 2, p=scores / scores.sum())
                idx = np.concatenate([hard, rng.integers(0, n, batch - batch // 2)])
            else:
                idx = rng.integers(0, n, batch)
            params, opt, per_ray = self._step(params, opt, t_params,
                                              *self._batch(rays, target, idx), jnp.asarray(w))
            if active:
                scores[idx] = np.asarray(per_ray) + 1e-8
            if eval_fn is not None and eval_every and (i + 1) % eval_every == 0:
                curve.append((i + 1, eval_fn(params)))
        return params, curve
