"""Path patching: the effect of sender components that flows through chosen receivers only.

For each sender cell (e.g. one head), in the noising direction of Wang et al. 2022
("Interpretability in the Wild", section 3.1):

1. Run the *clean* input with the sender set to its *corrupted* value and every other entry
   of the ``frozen_sites`` held at its clean value (so the sender's change reaches later
   layers only directly through the residual stream). Record ``receiver_site``.
2. Run the clean input again with ``receiver_site`` (where ``receiver_mask`` is 1) set to
   the recorded values, nothing else changed. The metric of this run is the cell's value.

Both runs of every cell are one vmapped computation over sender cells; the clean and
corrupted caches are shared by all cells. ``sender_cells`` evaluates only some cells (e.g.
candidate heads), the rest of the grid is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from mechinterp.site_io import _CallSignature, capture, list_sites
from mechinterp.interventions import Intervention
from mechinterp.sweep import (
    SweepResult,
    cell_maker,
    check_sweep_inputs,
    default_chunk_size,
    evaluate_metric,
    grid_mask,
    map_in_chunks,
    metric_argument,
)


def path_patch(model, params, clean_tokens, clean_cache: Mapping, corrupted_cache: Mapping,
               metric, sender_site: str, sender_grid: Sequence[str], receiver_site: str,
               receiver_mask=1.0, frozen_sites: Sequence[str] = ("attn.z",),
               chunk_size: int | None = None, progress: bool = True,
               model_kwargs: Mapping | None = None, sender_cells=None) -> SweepResult:
    """Metric per sender cell when only the path sender -> ``receiver_site`` is corrupted.

    ``sender_grid`` are axes of ``sender_site`` swept one cell at a time (e.g.
    ``("layer", "head")`` of ``attn.z``); ``receiver_mask`` broadcasts to
    ``receiver_site`` and selects the receivers (e.g. one head's queries in ``attn.q``,
    or every position of ``final_norm`` for the direct path to the logits).
    ``frozen_sites`` (and the sender site itself) are held at their clean values in the
    first run, apart from the sender cell; the receiver site may not be frozen.
    ``sender_cells`` (n, len(sender_grid)) ints: only these cells are run, the others are
    NaN in the result (default: every cell).
    """
    model_kwargs = dict(model_kwargs or {})
    inputs = (clean_tokens,)
    check_sweep_inputs(model, inputs, model_kwargs, metric, chunk_size)
    sites = list_sites(model, *inputs, **model_kwargs)
    for name in (sender_site, receiver_site, *frozen_sites):
        if name not in sites:
            raise KeyError(f"unknown site {name!r}; sites: {sorted(sites)}")
    if receiver_site in frozen_sites:
        raise ValueError(f"receiver site {receiver_site!r} cannot also be frozen")
    needed = {sender_site, *frozen_sites}
    for cache, which in ((clean_cache, "clean"), (corrupted_cache, "corrupted")):
        missing = sorted(n for n in needed if n not in cache)
        if which == "corrupted":
            missing = [n for n in missing if n == sender_site]
        if missing:
            raise KeyError(f"the {which} cache has no {missing}; capture them first")
    sender = sites[sender_site]
    unknown = [axis for axis in sender_grid if axis not in sender.axes]
    if unknown:
        raise ValueError(f"grid axes {unknown} are not axes of {sender_site!r} ({sender.axes})")

    grid_shape = tuple(sender.shape[sender.axes.index(axis)] for axis in sender_grid)
    cells = np.array(list(np.ndindex(*grid_shape)), np.int32).reshape(-1, len(sender_grid))
    if sender_cells is not None:
        cells = np.asarray(sender_cells, np.int32).reshape(-1, len(sender_grid))
        outside = [tuple(c) for c in cells.tolist()
                   if any(not 0 <= i < n for i, n in zip(c, grid_shape))]
        if outside:
            raise ValueError(f"sender_cells {outside} are outside the {sender_site!r} grid "
                             f"{dict(zip(sender_grid, grid_shape))}")
    caches = ({n: clean_cache[n] for n in needed},
              {sender_site: corrupted_cache[sender_site]})
    if chunk_size is None:
        chunk_size = max(1, default_chunk_size(model, inputs, model_kwargs) // 2)
    signature, arrays = _CallSignature.of(inputs, model_kwargs)
    metric_arg, static_metric = metric_argument(metric)
    cell = _make_path_cell(model, signature, sender_site, sender, tuple(sender_grid),
                           receiver_site, tuple(frozen_sites), static_metric)
    shared = (params, caches, arrays, jnp.asarray(receiver_mask, jnp.float32), metric_arg)
    values = map_in_chunks(cell, cells, shared, chunk_size,
                           desc=f"path {sender_site} -> {receiver_site}", progress=progress)
    grid = np.full(grid_shape, np.nan, np.float32)
    grid[tuple(cells.T)] = np.asarray(values).reshape(-1)
    return SweepResult(grid, tuple(sender_grid))


@cell_maker
def _make_path_cell(model, signature, sender_site, sender, sender_grid, receiver_site,
                    frozen_sites, static_metric):
    def cell(index, params, caches, arrays, receiver_mask, metric):
        clean, corrupted = caches
        args, kwargs = signature.rebuild(arrays)
        sender_mask = grid_mask(sender, sender_grid, index)
        first = {name: Intervention.patch(clean[name]) for name in frozen_sites}
        sender_value = jnp.where(sender_mask > 0, corrupted[sender_site], clean[sender_site])
        first[sender_site] = Intervention.patch(sender_value)
        _, recorded = capture(model, params, *args, sites=[receiver_site],
                              interventions=first, **kwargs)
        second = {receiver_site: Intervention.patch(recorded[receiver_site], receiver_mask)}
        return evaluate_metric(model, params, args, kwargs,
                               static_metric if metric is None else metric, second)

    return cell
