"""A synthetic 2-D scene and flatland volume rendering.

The scene is a few soft discs with densities and striped colours (:func:`make_scene`,
evaluated analytically by :func:`scene_field`). A ray at angle ``theta`` and offset ``s``
starts at ``s n - 1.5 d`` (``d = (cos, sin) theta``, ``n`` its normal) and is sampled at
``n_samples`` midpoints over length 3; the rendered colour is the NeRF quadrature
``C = sum_i T_i (1 - exp(-sigma_i delta)) c_i``, ``T_i = prod_{j<i} exp(-sigma_j delta)``
(black background); points outside [-1, 1]^2 have no density.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LENGTH = 3.0


def make_scene(seed: int, n_discs: int = 5, channels: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {"centre": rng.uniform(-0.6, 0.6, (n_discs, 2)),
            "radius": rng.uniform(0.15, 0.4, n_discs),
            "density": rng.uniform(2.0, 8.0, n_discs),
            "colour": rng.uniform(0.1, 1.0, (n_discs, channels)),
            "stripe": rng.uniform(6.0, 16.0, (n_discs, 2)) * rng.choice([-1, 1], (n_discs, 2))}


def scene_field(scene: dict, p) -> jnp.ndarray:
    """Ground-truth (density, colour) at points ``p`` (n, 2): (n, 1 + channels)."""
    p = jnp.asarray(p)
    dist = jnp.linalg.norm(p[:, None] - scene["centre"][None], axis=-1)
    w = scene["density"] * (1 / (1 + jnp.exp(-(scene["radius"] - dist) / 0.02)))
    stripes = 0.75 + 0.25 * jnp.sin((p[:, None] * scene["stripe"][None]).sum(-1))
    colours = scene["colour"][None] * stripes[..., None]
    colour = (w[..., None] * colours).sum(1) / (w.sum(1, keepdims=True) + 1e-6)
    return jnp.concatenate([w.sum(1, keepdims=True), colour], -1)


def ray_points(angles, offsets, n_samples: int):
    """Sample points (rays, n_samples, 2) and the inside-the-square mask."""
    d = jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    n = jnp.stack([-jnp.sin(angles), jnp.cos(angles)], -1)
    t = (jnp.arange(n_samples) + 0.5) * (LENGTH / n_samples)
    pts = (offsets[:, None] * n - 1.5 * d)[:, None] + t[None, :, None] * d[:, None]
    return pts, jnp.all(jnp.abs(pts) <= 1.0, -1)


def composite(values, inside, n_samples: int):
    """Rendered colours (rays, channels) from per-sample (density, colour)."""
    sigma = values[..., 0] * inside
    alpha = 1 - jnp.exp(-sigma * (LENGTH / n_samples))
    trans = jnp.cumprod(jnp.concatenate([jnp.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1),
                        1)
    return ((trans * alpha)[..., None] * values[..., 1:]).sum(1)


def render(field_fn, angles, offsets, n_samples: int):
    """``field_fn(points (n, 2)) -> (n, 1 + C)`` rendered along the rays: (rays, C)."""
    pts, inside = ray_points(angles, offsets, n_samples)
    values = field_fn(pts.reshape(-1, 2)).reshape(*pts.shape[:2], -1)
    return composite(values, inside, n_samples)


def views(n_views: int, n_rays: int, phase: float = 0.0):
    """Rays of ``n_views`` evenly spaced angles (shifted by ``phase`` of a step), each
    ``n_rays`` parallel rays across the square: (angles, offsets), flat."""
    angles = (np.arange(n_views) + phase) * (2 * np.pi / n_views)
    offsets = (np.arange(n_rays) + 0.5) / n_rays * 2 - 1
    a, o = np.meshgrid(angles, offsets, indexing="ij")
    return a.ravel().astype(np.float32), o.ravel().astype(np.float32)


def psnr(pred, target) -> float:
    mse = float(np.mean((np.asarray(pred) - np.asarray(target)) ** 2))
    return float(-10 * np.log10(max(mse, 1e-12)))
