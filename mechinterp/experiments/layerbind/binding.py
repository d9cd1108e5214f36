"""LayerBind's two phases (Wang et al., 2025) on a joint-attention DiT, as Euler sampling.

Tokens: ``n_cond`` conditioning tokens (``slot`` tokens per instance; a slot holding only
``null`` ids means "no instance"), then the image patches. Branch ``i`` keeps only instance
``i``'s slot and lets only the image tokens inside its region attend to it.

1. Instance initialization (steps ``k < fuse``): one latent per instance, all from the same
   noise, each sampled on its branch; at step ``fuse`` they are fused in layer order
   ``x = m_top x_top + (1 - m_top)(... (m_1 x_1 + (1 - m_1) x_bottom))`` (``m_i`` the region).
2. Semantic nursing (steps ``k >= fuse``): the global velocity ``v`` (every instance, plain
   attention) and, per instance bottom to top, ``v <- v + beta_k m_i (v_i - v)`` with
   ``v_i`` branch ``i``'s velocity and ``beta_k`` decaying linearly from ``beta`` to 0
   (the layer-transparency scheduler). Simplification: the layered path is composited on
   the velocities, not inside every attention layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_regions(regions, patch: int) -> np.ndarray:
    """(..., K, H, W) pixel regions -> (..., K, n_patches): a patch is in a region when
    any of its pixels is (row-major patches, as ``patchify``)."""
    r = np.asarray(regions, bool)
    h, w = r.shape[-2:]
    r = r.reshape(*r.shape[:-2], h // patch, patch, w // patch, patch).any((-1, -3))
    return r.reshape(*r.shape[:-2], -1)


def branch_inputs(cond, regions, order, *, patch: int, slot: int, null: int):
    """Per-instance conditioning and attention masks for branches in layer order.

    ``cond`` (B, n_cond) with instance ``k`` in slot ``k``; ``regions`` (B, K, H, W);
    ``order`` (B, K): instance ids bottom to top. Returns ``cond_b`` (B, K, n_cond) and
    ``mask_b`` (B, K, n_tokens, n_tokens): branch ``j`` is instance ``order[:, j]``."""
    cond, order = np.asarray(cond), np.asarray(order)
    b, n_cond = cond.shape
    k = order.shape[1]
    tok = token_regions(regions, patch)  # (B, K, P)
    n = n_cond + tok.shape[-1]
    cond_b = np.full((b, k, n_cond), null, cond.dtype)
    mask_b = np.ones((b, k, n, n), bool)
    for s in range(b):
        for j, inst in enumerate(order[s]):
            own = slice(inst * slot, (inst + 1) * slot)
            cond_b[s, j, own] = cond[s, own]
            outside = np.concatenate([np.zeros(n_cond, bool), ~tok[s, inst]])
            mask_b[s, j][np.ix_(outside, np.arange(n)[own])] = False
    return cond_b, mask_b


def layerbind_sample(velocity, noise, cond, regions, order, *, n_steps: int, fuse: int,
                     beta: float, patch: int, slot: int, null: int):
    """Sample with LayerBind (module docstring). ``velocity(x, t, cond, mask)`` is the
    model (``mask`` may be None); ``noise`` (B, H, W, C); returns the images (B, H, W, C).
    ``fuse = 0`` skips the initialization; ``fuse = n_steps`` never leaves it (then the
    branches are fused at the end)."""
    if not 0 <= fuse <= n_steps:
        raise ValueError(f"fusion step must be in 0..n_steps={n_steps}, got {fuse}")
    b, k = np.shape(order)
    cond_b, mask_b = branch_inputs(cond, regions, order, patch=patch, slot=slot, null=null)
    flat_cond = jnp.asarray(cond_b.reshape(b * k, -1))
    flat_mask = jnp.asarray(mask_b.reshape(b * k, *mask_b.shape[2:]))
    pixel = jnp.asarray(np.take_along_axis(np.asarray(regions, np.float32),
                                           np.asarray(order)[..., None, None], 1))[..., None]
    branches = jnp.repeat(jnp.asarray(noise)[:, None], k, 1)
    x = None

    def fused(xs):
        out = xs[:, 0]
        for j in range(1, k):
            out = pixel[:, j] * xs[:, j] + (1 - pixel[:, j]) * out
        return out

    for step in range(n_steps):
        t = 1.0 - step / n_steps
        if step < fuse:
            v = velocity(branches.reshape(b * k, *branches.shape[2:]),
                         jnp.full((b * k,), t), flat_cond, flat_mask)
            branches = branches - v.reshape(branches.shape) / n_steps
            continue
        if x is None:
            x = fused(branches)
        strength = beta * (1 - (step - fuse) / max(n_steps - fuse, 1))
        v = velocity(x, jnp.full((b,), t), jnp.asarray(cond), None)
        vb = velocity(jnp.repeat(x, k, 0), jnp.full((b * k,), t), flat_cond,
                      flat_mask).reshape(b, k, *x.shape[1:])
        for j in range(k):
            v = v + strength * pixel[:, j] * (vb[:, j] - v)
        x = x - v / n_steps
    return fused(branches) if x is None else x


def make_velocity(model, params):
    """``velocity(x, t, cond, mask)`` of a joint-attention DiT, compiled once per shape."""
    apply = jax.jit(lambda x, t, c, m: model.apply({"params": params}, x, t, cond=c,
                                                    attn_mask=m))
    return lambda x, t, c, m: apply(x, t.astype(jnp.float32), c, m)
