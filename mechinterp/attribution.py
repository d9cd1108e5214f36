"""Attribution patching: every cell of every grid from one forward and one backward.

Patching a cell with mask ``m`` gives ``x' = x_corrupt + m * (x_clean - x_corrupt)``; to
first order in ``m`` the metric changes by

    metric(patched) - metric(corrupt) ~= sum_cell (x_clean - x_corrupt) . d metric / d x,

which is exactly ``d metric / d m`` at ``m = 0``: the gradient with respect to the
intervention masks (Nanda 2023, "Attribution patching"; Syed et al. 2023). One backward pass
gives it for all cells of all requested grids at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from mechinterp.site_io import _CallSignature, list_sites
from mechinterp.interventions import Intervention
from mechinterp.sweep import (SweepResult, cell_maker, check_sweep_inputs, evaluate_metric,
                              metric_argument)


def _grid_shape(info, grid_axes):
    unknown = [axis for axis in grid_axes if axis not in (info.axes or ())]
    if unknown:
        raise ValueError(f"grid axes {unknown} are not axes of site {info.name!r} ({info.axes})")
    return tuple(size if axis in grid_axes else 1 for axis, size in zip(info.axes, info.shape))


def attribution_patch(model, params, corrupted_inputs, clean_cache: Mapping,
                      metric, grids: Mapping[str, Sequence[str]],
                      model_kwargs: Mapping | None = None) -> dict[str, SweepResult]:
    """Estimated ``metric(patched) - metric(corrupt)`` per cell, for each ``{site: grid_axes}``.

    Same meaning as the exact grids of :mod:`mechinterp.patching` minus the corrupted
    metric, e.g. ``grids={"resid_pre": ("layer", "pos"), "attn.z": ("layer", "head")}``.
    """
    model_kwargs = dict(model_kwargs or {})
    inputs = tuple(corrupted_inputs) if isinstance(corrupted_inputs, (tuple, list)) else (
        corrupted_inputs,)
    check_sweep_inputs(model, inputs, model_kwargs, metric, None)
    sites = list_sites(model, *inputs, **model_kwargs)
    zeros = {}
    for name, grid_axes in grids.items():
        if name not in sites:
            raise KeyError(f"unknown site {name!r}; sites: {sorted(sites)}")
        if name not in clean_cache:
            raise KeyError(f"the clean cache has no {name!r}; capture it first")
        zeros[name] = jnp.zeros(_grid_shape(sites[name], grid_axes), jnp.float32)

    clean = {name: clean_cache[name] for name in grids}
    signature, arrays = _CallSignature.of(inputs, model_kwargs)
    metric_arg, static_metric = metric_argument(metric)
    gradient = _make_mask_gradient(model, signature, static_metric)
    grads = gradient(zeros, params, clean, arrays, metric_arg)
    results = {}
    for name, grid_axes in grids.items():
        axes = sites[name].axes
        kept = [axes.index(axis) for axis in grid_axes]
        dropped = tuple(d for d in range(len(axes)) if d not in kept)
        values = jnp.squeeze(grads[name], dropped)
        order = sorted(range(len(kept)), key=lambda k: kept[k])  # axes as they sit in values
        values = jnp.transpose(values, [order.index(k) for k in range(len(kept))])
        results[name] = SweepResult(jax.device_get(values), tuple(grid_axes))
    return results


@cell_maker
def _make_mask_gradient(model, signature, static_metric):
    """The jitted gradient of the metric with respect to the patching masks (cached, so a
    repeated call on inputs of the same shapes compiles nothing)."""
    def patched_metric(masks, params, clean, arrays, metric):
        args, kwargs = signature.rebuild(arrays)
        interventions = {name: Intervention.patch(clean[name], masks[name]) for name in masks}
        return evaluate_metric(model, params, args, kwargs,
                               static_metric if metric is None else metric, interventions)

    return jax.jit(jax.grad(patched_metric))
