"""Zero, mean and resample ablation of components and of sets of components (circuits).

- zero: ``x -> 0`` on the selected entries.
- mean: ``x -> mean of x over a reference dataset`` (computed once, :func:`mean_activations`).
- resample: ``x -> x on another input`` (:func:`resample_activations`, seeded).

All three are one :class:`~mechinterp.Intervention` per site with a mask built from the
components (:mod:`mechinterp.components`). A sweep over many sets is one vmapped
computation over their masks (:func:`sweep_component_sets`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import validate
from mechinterp.site_io import capture, intervene, list_sites
from mechinterp.components import Component, component_masks
from mechinterp.interventions import Intervention
from mechinterp.metrics import Accuracy
from mechinterp.site_io import _CallSignature
from mechinterp.sweep import (SweepResult, cell_maker, check_sweep_inputs, default_chunk_size,
                              evaluate_metric, map_in_chunks, metric_argument)
from mechinterp.sweep_mesh import placement

METHODS = ("zero", "mean", "resample")


def _as_inputs(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def mean_activations(model, params, batches: Iterable, sites: Sequence[str], **kwargs):
    """Mean of each site over every example of ``batches`` (batch axis kept, size 1).

    ``batches`` yields model inputs (an array or a tuple of arrays), all of one shape.
    Computed once; pass the result as ``values`` to :func:`ablate`.
    """
    totals, count, first_shapes = None, 0, None
    for k, batch in enumerate(batches):
        inputs = _as_inputs(batch)
        shapes = [tuple(np.shape(x)) for x in inputs]
        if first_shapes is None:
            first_shapes = shapes
        elif [s[1:] for s in shapes] != [s[1:] for s in first_shapes]:
            raise ValueError(
                f"mean_activations: batch {k} has input shapes {shapes} but batch 0 has "
                f"{first_shapes}; every batch must have one sequence length (only the batch "
                "size may differ), else the means would broadcast across lengths")
        _, cache = capture(model, params, *inputs, sites=list(sites), **kwargs)
        info = list_sites(model, *inputs, **kwargs)
        sums = {
            name: cache[name].astype(jnp.float32).sum(info[name].axes.index("batch"), keepdims=True)
            for name in sites
        }
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        count += inputs[0].shape[0]
    if totals is None:
        raise ValueError("mean_activations got no batches: the reference dataset is empty")
    return {name: (total / count).astype(info[name].dtype) for name, total in totals.items()}


def resample_activations(model, params, reference_inputs, sites: Sequence[str], seed: int,
                         **kwargs):
    """Each site captured on ``reference_inputs`` with its batch rows shuffled (seeded).

    ``reference_inputs`` must have the shape of the inputs being ablated; example ``i`` is
    ablated with the activation of reference example ``perm[i]``.
    """
    inputs = _as_inputs(reference_inputs)
    validate.check_model_inputs(model, inputs, kwargs)
    _, cache = capture(model, params, *inputs, sites=list(sites), **kwargs)
    info = list_sites(model, *inputs, **kwargs)
    perm = np.random.default_rng(seed).permutation(inputs[0].shape[0])
    return {name: jnp.take(cache[name], perm, axis=info[name].axes.index("batch"))
            for name in sites}


def ablation_interventions(sites, components: Iterable[Component], method: str = "zero",
                           values: Mapping | None = None) -> dict[str, Intervention]:
    """``{site: Intervention}`` ablating ``components`` by ``method``."""
    masks = component_masks(sites, components)
    replacement = _replacement_values(method, values, masks, sites)
    return {name: Intervention(scale=0.0, add=replacement[name], mask=mask)
            for name, mask in masks.items()}


def _replacement_values(method: str, values: Mapping | None, names, sites=None) -> dict:
    """What each site's ablated entries become: 0, or the given mean/resampled values."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "zero":
        return {name: 0.0 for name in names}
    missing = [name for name in names if values is None or name not in values]
    if missing:
        helper = "mean_activations" if method == "mean" else "resample_activations"
        raise ValueError(f"{method} ablation needs values for sites {missing}: compute them "
                         f"with mechinterp.ablation.{helper}")
    if method == "resample" and sites is not None:
        for name in names:  # one source per example: a batch of 1 would broadcast silently
            validate.check_same_shape(sites[name].shape, tuple(np.shape(values[name])),
                                      f"resample values for site {name!r}",
                                      "the ablated run's site", "the resampled source")
    return {name: values[name] for name in names}


def ablate(model, params, *inputs, components: Iterable[Component], method: str = "zero",
           values: Mapping | None = None, **kwargs):
    """The model's outputs with ``components`` ablated together."""
    validate.check_model_inputs(model, inputs, kwargs)
    sites = list_sites(model, *inputs, **kwargs)
    interventions = ablation_interventions(sites, components, method, values)
    return intervene(model, params, *inputs, interventions=interventions, **kwargs)


def sweep_component_sets(model, params, inputs, component_sets: Sequence[Iterable[Component]],
                         metric, method: str = "zero", values: Mapping | None = None,
                         chunk_size: int | None = None, progress: bool = True,
                         model_kwargs: Mapping | None = None, mesh=None,
                         rules=None) -> SweepResult:
    """``metric`` with each set of components ablated, all sets as one vmapped computation.

    Every set gets a mask on every site any set touches (zeros where it touches nothing),
    so the sets stack into one batch of masks; the ablation values are shared. ``mesh``
    and ``rules``: sets split over the mesh as a sweep's cells are
    (:mod:`mechinterp.sweep_mesh`).
    """
    model_kwargs = dict(model_kwargs or {})
    inputs = _as_inputs(inputs)
    check_sweep_inputs(model, inputs, model_kwargs, metric, chunk_size)
    sites = list_sites(model, *inputs, **model_kwargs)
    per_set = [component_masks(sites, components) for components in component_sets]
    if not per_set:
        raise ValueError("sweep_component_sets got no component sets")
    names = sorted({name for masks in per_set for name in masks})
    full = {name: tuple(max(m[name].shape[d] for m in per_set if name in m)
                        for d in range(len(sites[name].shape))) for name in names}
    stacked = {name: np.stack([np.broadcast_to(masks.get(name, np.zeros(())), full[name])
                               for masks in per_set]) for name in names}
    replacement = _replacement_values(method, values, names, sites)
    place = placement(mesh, rules)
    if place is not None:
        params = place.params(model, params, inputs)
        replacement = place.replicate(replacement, "the ablation values")

    signature, arrays = _CallSignature.of(inputs, model_kwargs)
    metric_arg, static_metric = metric_argument(metric)
    if chunk_size is None:
        chunk_size = default_chunk_size(model, inputs, model_kwargs) * (place.ways if place
                                                                        else 1)
    if place is not None:
        arrays = place.replicate(arrays, "the inputs")
        metric_arg = place.replicate(metric_arg, "the metric")
    result = map_in_chunks(_make_set_cell(model, tuple(names), signature, static_metric),
                           stacked, (params, replacement, arrays, metric_arg), chunk_size,
                           desc="ablate sets", progress=progress, placement=place)
    return SweepResult(result, ("set",), {"set": [", ".join(map(str, s)) for s in component_sets]})


@cell_maker
def _make_set_cell(model, names, signature, static_metric):
    def one_set(masks, params, replacement, arrays, metric):
        args, kwargs = signature.rebuild(arrays)
        interventions = {name: Intervention(scale=0.0, add=replacement[name], mask=masks[name])
                         for name in names}
        return evaluate_metric(model, params, args, kwargs,
                               static_metric if metric is None else metric, interventions)

    return one_set


def accuracy_under_ablation(model, params, tokens, answer_ids, components: Iterable[Component],
                            method: str = "zero", values: Mapping | None = None, pos=-1,
                            **kwargs) -> float:
    """Top-1 accuracy on ``answer_ids`` at ``pos`` with ``components`` ablated."""
    validate.check_model_inputs(model, (tokens,), kwargs)
    sites = list_sites(model, tokens, **kwargs)
    interventions = ablation_interventions(sites, components, method, values)
    metric = Accuracy(pos=pos, answer_ids=answer_ids)
    return float(evaluate_metric(model, params, (tokens,), kwargs, metric, interventions))
