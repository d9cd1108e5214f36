"""The sweep engine: a grid of single-cell interventions as one vmapped computation.

A grid names some axes of a site (e.g. ``("layer", "pos")`` of ``resid_pre``). Each grid
cell is an intervention whose mask is one-hot on those axes and 1 on every other axis. The
cells are evaluated with ``jax.vmap`` over their integer indices only: each cell builds its
mask inside the computation, and the large operand (the source cache that values are
patched from) is shared by all cells (``in_axes=None``). Cells run in equal chunks (the last
one padded) so memory stays within a budget and one compilation serves the whole grid.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mechinterp.api import SiteInfo, intervene, list_sites
from mechinterp.interventions import Intervention
from mechinterp.metrics import Metric

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of activations for one chunk of cells


@dataclasses.dataclass
class SweepResult:
    """Metric values over a grid, with axis names and per-axis labels.

    ``np.asarray(result)`` gives the values; :meth:`to_pandas` a long-form DataFrame.
    """

    values: np.ndarray
    axes: tuple[str, ...]
    labels: dict[str, list] = dataclasses.field(default_factory=dict)

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def to_numpy(self) -> np.ndarray:
        return self.values

    def save(self, path) -> None:
        """Write values, axes and labels to one ``.npz`` file (``mechinterp plot`` reads it)."""
        meta = json.dumps({"axes": list(self.axes), "labels": self.labels})
        np.savez(path, values=self.values, meta=np.array(meta))

    @classmethod
    def load(cls, path) -> "SweepResult":
        with np.load(path) as data:
            if "values" not in data or "meta" not in data:
                raise ValueError(f"{path} is not a saved SweepResult (needs 'values' and 'meta')")
            meta = json.loads(str(data["meta"]))
            return cls(data["values"], tuple(meta["axes"]), meta["labels"])

    def to_pandas(self):
        import pandas as pd  # optional: only needed for this conversion

        index = pd.MultiIndex.from_product(
            [self.labels.get(axis, range(n)) for axis, n in zip(self.axes, self.shape)],
            names=list(self.axes),
        )
        return pd.Series(self.values.reshape(-1), index=index, name="metric").reset_index()


def _accepts_logit_positions(model) -> bool:
    return "logit_positions" in inspect.signature(type(model).__call__).parameters


def evaluate_metric(model, params, inputs, kwargs, metric, interventions):
    """Run ``model`` with ``interventions`` and reduce its logits with ``metric``.

    A :class:`~mechinterp.metrics.Metric` on a model that accepts ``logit_positions`` gets
    only the logits it reads; any other callable gets the full logits.
    """
    if isinstance(metric, Metric) and _accepts_logit_positions(model):
        batch, seq_len = inputs[0].shape[:2]
        kwargs = dict(kwargs, logit_positions=metric.positions(batch, seq_len))
        logits = intervene(model, params, *inputs, interventions=interventions, **kwargs)
        return metric.on_selected(logits)
    return metric(intervene(model, params, *inputs, interventions=interventions, **kwargs))


def grid_mask(info: SiteInfo, grid_axes: Sequence[str], index: jax.Array) -> jax.Array:
    """One-hot over ``grid_axes`` at ``index``, size 1 (broadcast) on every other axis."""
    mask = jnp.ones((1,) * len(info.shape), jnp.float32)
    for k, axis in enumerate(grid_axes):
        dim = info.axes.index(axis)
        shape = [1] * len(info.shape)
        shape[dim] = info.shape[dim]
        one_hot = (jnp.arange(info.shape[dim]) == index[k]).astype(jnp.float32)
        mask = mask * one_hot.reshape(shape)
    return mask


def _bytes_per_cell(model, inputs, kwargs) -> int:
    sites = list_sites(model, *inputs, **kwargs)
    return 2 * sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in sites.values())


def sweep(
    model,
    params,
    inputs: Sequence,
    site_name: str,
    grid_axes: Sequence[str],
    source: jax.Array,
    metric: Callable,
    *,
    make_intervention: Callable[[jax.Array, jax.Array], Intervention] = Intervention.patch,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
    labels: Mapping[str, list] | None = None,
) -> SweepResult:
    """Evaluate ``metric`` with one intervention per cell of a grid over ``site_name``.

    ``make_intervention(source, mask)`` builds each cell's intervention (default: patch
    ``source`` where the mask is 1). ``chunk_size`` cells run at once; by default as many as
    fit ``memory_budget`` bytes of activations. ``labels`` name the entries of grid axes
    (e.g. ``{"pos": token_strings}``) for tables and plots. Errors (unknown site or axis, a source of the
    wrong shape, a metric that does not return a scalar) are raised before any compile.
    """
    model_kwargs = dict(model_kwargs or {})
    inputs = tuple(inputs)
    sites = list_sites(model, *inputs, **model_kwargs)
    if site_name not in sites:
        # the same message intervene would give, raised before any compilation
        intervene(model, params, *inputs, interventions={site_name: Intervention.noop()},
                  **model_kwargs)
    info = sites[site_name]
    unknown = [axis for axis in grid_axes if axis not in (info.axes or ())]
    if unknown:
        raise ValueError(
            f"grid axes {unknown} are not axes of site {site_name!r}, whose axes are {info.axes}"
        )
    if tuple(np.shape(source)) != info.shape:
        raise ValueError(
            f"the source for site {site_name!r} has shape {tuple(np.shape(source))}, expected "
            f"{info.shape} (axes {info.axes}): capture it from inputs of the same shape"
        )
    grid_shape = tuple(info.shape[info.axes.index(axis)] for axis in grid_axes)

    def cell(index, params, source):
        intervention = make_intervention(source, grid_mask(info, grid_axes, index))
        return evaluate_metric(
            model, params, inputs, model_kwargs, metric, {site_name: intervention}
        )

    probe = jax.eval_shape(cell, jnp.zeros(len(grid_axes), jnp.int32), params, source)
    if probe.shape != ():
        raise ValueError(
            f"the patching metric must return a scalar, got shape {probe.shape}; reduce over "
            "the batch (e.g. .mean())"
        )

    cells = np.array(list(itertools.product(*map(range, grid_shape))), np.int32).reshape(
        -1, len(grid_axes)
    )
    if chunk_size is None:
        chunk_size = default_chunk_size(model, inputs, model_kwargs, memory_budget)
    values = map_in_chunks(cell, cells, (params, source), chunk_size,
                           desc=f"patch {site_name}", progress=progress)
    return SweepResult(values.reshape(grid_shape), tuple(grid_axes), dict(labels or {}))


def default_chunk_size(model, inputs, model_kwargs, memory_budget=DEFAULT_MEMORY_BUDGET) -> int:
    """How many forwards fit ``memory_budget`` bytes, counting every site's activation twice."""
    return max(1, memory_budget // _bytes_per_cell(model, inputs, model_kwargs))


def map_in_chunks(fn, items, shared, chunk_size: int, *, desc: str, progress: bool = True):
    """``np.stack([fn(item, *shared) for item in items])``, as ``jit(vmap(fn))`` over chunks.

    ``items`` is a pytree whose leaves share a leading axis; ``shared`` is passed unbatched
    (``in_axes=None``), so large operands are not copied per item. The last chunk is padded
    by repeating its final item, so every chunk has one shape and compiles once.
    """
    n = len(jax.tree.leaves(items)[0])
    chunk_size = -(-n // -(-n // int(chunk_size)))  # as many chunks, but equal: pad < 1 per chunk
    run = jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * len(shared)))
    values = []
    for start in tqdm(range(0, n, chunk_size), desc=desc, disable=not progress, leave=False):
        size = min(chunk_size, n - start)

        def take(leaf):
            chunk = leaf[start:start + size]
            return np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - size, 0)])

        values.append(np.asarray(run(jax.tree.map(take, items), *shared))[:size])
    return np.concatenate(values)
