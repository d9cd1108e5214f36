"""Flow matching for image models and a deterministic Euler sampler whose every step can
carry interventions and return activations.

Rectified flow (Liu et al., 2023; Lipman et al., 2023, eq. 23 with sigma_min = 0):
``x_t = (1 - t) x_0 + t eps``, ``eps ~ N(0, I)``, and the model (e.g.
:class:`~mechinterp.models.dit.DiT`, called ``model(x_t, t, **kwargs)``) regresses the
velocity ``v = eps - x_0``: ``L = E_{t, eps} ||v_theta(x_t, t) - v||^2``. Sampling
integrates ``dx/dt = v`` from noise at ``t = 1`` to ``t = 0`` with ``n_steps`` Euler steps
at ``t_k = 1 - k / n_steps``: ``x_{k+1} = x_k - v_theta(x_k, t_k) / n_steps``. With
classifier-free guidance (Ho & Salimans, 2022) the step uses ``v_u + w (v_c - v_u)``: ``v_c``
conditional, ``v_u`` with the conditioning replaced by a null (e.g. a null class).

Key names: :func:`flow_pair`, :func:`flow_loss`, :func:`euler_sample` (interventions and
site reads per step: each site read gets a leading ``step`` axis) and :func:`at_steps`
(an intervention applied only at some steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from mechinterp.interventions import Intervention
from mechinterp.site_io import intervention_variables, read_sites
from mechinterp.sites import INTERMEDIATES


def flow_pair(images, noise, t):
    """``(x_t, v)``: the noised images and the velocity target, ``t`` (batch,)."""
    tb = jnp.asarray(t, jnp.float32).reshape(-1, *([1] * (images.ndim - 1)))
    return (1 - tb) * images + tb * noise, noise - images


def flow_loss(model, params, images, noise, t, **model_kwargs):
    """Mean over the batch of ``mean_pixels (v_theta(x_t, t) - v)^2`` (the model's own
    auxiliary losses, e.g. MoE balance, are not included: see ``mechinterp.train``)."""
    x_t, target = flow_pair(images, noise, t)
    v = model.apply({"params": params}, x_t, t, **model_kwargs)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - target))


def at_steps(intervention: Intervention, steps: Sequence[int], n_steps: int) -> Intervention:
    """``intervention`` at the sampler steps ``steps`` only (a no-op at the others), as the
    per-step form :func:`euler_sample` takes: every field gets a leading step axis."""
    on = jnp.zeros(n_steps, jnp.float32).at[jnp.asarray(list(steps), jnp.int32)].set(1.0)
    fields = {k: jnp.asarray(v) for k, v in intervention.fields().items()}
    mask = on.reshape(-1, *([1] * fields["mask"].ndim)) * fields["mask"]
    return Intervention(scale=jnp.broadcast_to(fields["scale"], (n_steps, *fields["scale"].shape)),
                        add=jnp.broadcast_to(fields["add"], (n_steps, *fields["add"].shape)),
                        mask=mask)


def _step_slice(interventions: Mapping[str, Intervention], k, n_steps: int):
    out = {}
    for name, iv in interventions.items():
        fields = {}
        for field, value in iv.fields().items():
            value = jnp.asarray(value)
            if value.ndim == 0 or value.shape[0] != n_steps:
                raise ValueError(
                    f"the intervention on site {name!r} for euler_sample needs every field "
                    f"with a leading step axis of size n_steps={n_steps}; field {field!r} "
                    f"has shape {value.shape} (wrap a plain intervention in at_steps(iv, "
                    f"range(n_steps), n_steps) to apply it at every step)")
            fields[field] = value[k]
        out[name] = Intervention(**fields)
    return out


def euler_sample(model, params, noise, n_steps: int, *, interventions=None, sites=(),
                 guidance: float = 1.0, null_kwargs: Mapping | None = None, **model_kwargs):
    """Sample from ``noise`` (batch, ...) at ``t = 1`` with ``n_steps`` Euler steps; return
    ``(images, cache)`` where ``cache[name]`` stacks site ``name`` over steps (step, ...).

    ``interventions``: ``{site: Intervention}`` whose fields have a leading step axis of
    size ``n_steps`` (:func:`at_steps` builds one); ``sites``: names to read at every step.
    ``model_kwargs`` (class ids, conditioning tokens, masks) are the same at every step.
    ``null_kwargs``: the ``model_kwargs`` to replace in the unconditional pass of guidance
    ``guidance`` (e.g. ``{"y": null class ids}``; a traced scale needs them); interventions
    act on both passes, sites are read from the conditional one. No ``null_kwargs``: no
    guidance (one pass); ``guidance=1`` with them gives the unguided samples.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    unknown = set(null_kwargs or {}) - set(model_kwargs)
    if unknown or (not null_kwargs and not (isinstance(guidance, (int, float))
                                            and guidance == 1.0)):
        raise ValueError(
            f"classifier-free guidance {guidance} needs null_kwargs naming model keyword "
            f"arguments of this call ({sorted(model_kwargs)}), e.g. null_kwargs={{'y': null "
            f"ids}}; got {sorted(null_kwargs or {})}")
    unconditional = {**model_kwargs, **(null_kwargs or {})}
    interventions = dict(interventions or {})
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    noise = jnp.asarray(noise, jnp.float32)
    batch = noise.shape[0]

    def step(x, k):
        t = jnp.full((batch,), 1.0, jnp.float32) - k.astype(jnp.float32) / n_steps
        variables, infos = intervention_variables(
            model, x, t, interventions=_step_slice(interventions, k, n_steps), **model_kwargs)
        variables = {"params": params, **variables}
        if names:
            v, state = model.apply(variables, x, t, mutable=[INTERMEDIATES], **model_kwargs)
            read = read_sites(state, infos, names)
        else:
            v, read = model.apply(variables, x, t, **model_kwargs), {}
        if null_kwargs:
            v_u = model.apply(variables, x, t, **unconditional)
            v = v_u + guidance * (v - v_u)
        return x - v.astype(jnp.float32) / n_steps, read

    return jax.lax.scan(step, noise, jnp.arange(n_steps))
