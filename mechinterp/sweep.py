"""The sweep engine: a grid of single-cell interventions as a few vmapped computations.

A grid names some axes of a site (e.g. ``("layer", "pos")`` of ``resid_pre``). Each cell is
an intervention whose mask is one-hot on those axes; cells run with ``jax.vmap`` over their
indices only, sharing the large operand (the source cache, ``in_axes=None``), in equal
chunks that fit a memory budget. A metric that names the logits it reads gets only those
from a family with the output-selection capability (:mod:`mechinterp.family`).

Reuse: a family with the resume protocol (:class:`mechinterp.family.Resumable`) lets the
sweep group cells by layer and block of positions and run each group from the cached
residual stream at its layer, for its positions only (a patch at layer ``l``, position ``p``
of a causal model changes nothing below ``l`` or before ``p``). ``position_blocks`` sets
how many position groups there are. Each :class:`SweepResult` reports the matmul FLOPs it
executed and those of the naive way (one full forward, full logits, per cell).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mechinterp import validate
from mechinterp.site_io import SiteInfo, _CallSignature, _hashable, intervene, list_sites
from mechinterp.family import Resumable, SelectsOutputs, has, require
from mechinterp.jaxpr_flops import matmul_flops
from mechinterp.interventions import Intervention
from mechinterp.metrics import Metric

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of activations for one chunk of cells
DEFAULT_POSITION_BLOCKS = 4
# Reuse costs one compilation per group of cells (about a second or two each on a laptop
# CPU). With reuse=None a grid reuses when its naive work (matmul FLOPs of one full forward
# per cell) is at least this much per group, i.e. when the compute saved outweighs them.
REUSE_FLOPS_PER_GROUP = 1e11
LAYER_AXIS = "layer"
POSITION_AXES = ("pos", "query_pos")  # a patch there changes this position and later ones


@dataclasses.dataclass
class SweepResult:
    """Metric values over a grid, with axis names and per-axis labels.

    ``np.asarray(result)`` gives the values; :meth:`to_pandas` a long-form DataFrame.
    ``cost`` (when the sweep engine produced it): ``flops``, the matmul FLOPs executed
    (padding included), ``naive_flops``, those of one full forward with full logits per
    cell (how TransformerLens evaluates a grid), and ``groups``, the computations run.
    """

    values: np.ndarray
    axes: tuple[str, ...]
    labels: dict[str, list] = dataclasses.field(default_factory=dict)
    cost: dict[str, int] | None = None

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def to_numpy(self) -> np.ndarray:
        return self.values

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        """Notebooks show the values as a labelled heatmap
        (:func:`mechinterp.display.heatmap_html`)."""
        from mechinterp.display import heatmap_html

        return {"text/html": heatmap_html(self.values, self.axes, self.labels),
                "text/plain": repr(self)}

    def __treescope_repr__(self, path, subtree_renderer):
        from mechinterp import treescope_repr

        return treescope_repr.sweep_result(self, path, subtree_renderer)

    def save(self, path) -> None:
        """Write values, axes, labels and cost to one ``.npz`` file (``mechinterp plot``
        reads it)."""
        meta = json.dumps({"axes": list(self.axes), "labels": self.labels, "cost": self.cost})
        np.savez(path, values=self.values, meta=np.array(meta))

    @classmethod
    def load(cls, path) -> "SweepResult":
        with np.load(path) as data:
            if "values" not in data or "meta" not in data:
                raise ValueError(f"{path} is not a saved SweepResult (needs 'values' and 'meta')")
            meta = json.loads(str(data["meta"]))
            return cls(data["values"], tuple(meta["axes"]), meta["labels"], meta.get("cost"))

    def to_pandas(self):
        import pandas as pd  # optional: only needed for this conversion

        index = pd.MultiIndex.from_product(
            [self.labels.get(axis, range(n)) for axis, n in zip(self.axes, self.shape)],
            names=list(self.axes),
        )
        return pd.Series(self.values.reshape(-1), index=index, name="metric").reset_index()


def _selects_logits(model, metric) -> bool:
    return isinstance(metric, Metric) and has(model, SelectsOutputs)


def evaluate_metric(model, params, inputs, kwargs, metric, interventions,
                    logit_positions=None):
    """Run ``model`` with ``interventions`` and reduce its logits with ``metric``.

    A :class:`~mechinterp.metrics.Metric` on a family with output selection
    (:class:`~mechinterp.family.SelectsOutputs`) gets only the logits it reads (at
    ``logit_positions`` if given, else at the metric's own positions; only its ``columns``
    if it names some and the family selects columns); any other callable gets the full
    logits.
    """
    if isinstance(metric, Metric) and validate.is_concrete(inputs) and inputs and hasattr(
            inputs[0], "shape"):  # an eager call: check positions and answer ids
        check_sweep_inputs(model, tuple(inputs), kwargs, metric, None)
    if _selects_logits(model, metric):
        if logit_positions is None:
            batch, seq_len = inputs[0].shape[:2]
            logit_positions = metric.positions(batch, seq_len)
        columns = (metric.columns(logit_positions.shape[0])
                   if "columns" in model.selectable_outputs else None)
        kwargs = dict(kwargs, **model.output_selection(logit_positions, columns))
        logits = intervene(model, params, *inputs, interventions=interventions, **kwargs)
        return metric.on_selected(logits) if columns is None else metric.on_columns(logits)
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


# ---------------------------------------------------------------------------------------
# Grouping cells by where they can resume.


def _cut(x, axes: Sequence[str], start: tuple[int, int]):
    """``x`` sliced to a resumed run: ``[first_layer:]`` on the layer axis and
    ``[first_pos:]`` on position axes (axes of size 1 broadcast and stay)."""
    first_layer, first_pos = start
    begins = {LAYER_AXIS: first_layer, **dict.fromkeys(POSITION_AXES, first_pos)}
    return x[tuple(slice(begins.get(axis, 0) if size > 1 else 0, None)
                   for axis, size in zip(axes, x.shape))]


def _resume_state(model, params, inputs, model_kwargs, info, grid_axes, reuse, worth_it):
    """The model's resume state if this grid can (and, with ``reuse=None``, should:
    ``worth_it``) use it, else ``None``. ``reuse=True`` where it cannot is an error."""
    if reuse is False or (reuse is None and not worth_it):
        return None
    name = type(model).__name__
    if not has(model, Resumable):
        if reuse:
            require(model, Resumable, "sweep(reuse=True) (pass reuse=False or None)")
        return None
    why = None
    if not info.axes or info.axes[0] != LAYER_AXIS or LAYER_AXIS not in grid_axes:
        why = f"the grid {grid_axes} over site {info.name!r} has no layer axis to start from"
    state = None if why else model.resume_state(params, *inputs, **model_kwargs)
    if state is None and why is None:
        why = f"{name}.resume_state returned None for these inputs"
    if state is None and reuse:
        raise ValueError(f"reuse=True, but {why}: pass reuse=False (or None to decide)")
    return state


def _group_cells(cells, grid_axes, seq_len, last_first_pos, position_blocks):
    """``{(first_layer, first_pos): cell rows}``: where each cell's run can start.

    ``first_pos`` is the start of the cell's block of positions, but never after
    ``last_first_pos`` (the first position the metric reads, or 0 when it reads them all).
    """
    layer = cells[:, list(grid_axes).index(LAYER_AXIS)]
    pos_axes = [k for k, axis in enumerate(grid_axes) if axis in POSITION_AXES]
    if pos_axes and last_first_pos > 0:
        starts = np.unique([seq_len * b // position_blocks for b in range(position_blocks)])
        first = starts[np.searchsorted(starts, cells[:, pos_axes[0]], side="right") - 1]
        first = np.minimum(first, last_first_pos)
    else:
        first = np.zeros(len(cells), np.int64)
    groups: dict[tuple[int, int], np.ndarray] = {}
    for key in sorted(set(zip(layer.tolist(), first.tolist()))):
        groups[key] = np.flatnonzero((layer == key[0]) & (first == key[1]))
    return groups


# ---------------------------------------------------------------------------------------
# The cell function: one per (site, grid, call signature, start), cached across calls so a
# repeated sweep reuses its compilation. Everything that is an array is an argument.


def _make_cell(model, site_name, info, grid_axes, make_intervention, signature, start,
               static_metric):
    def cell(index, params, source, arrays, metric, logit_positions):
        mask = grid_mask(info, grid_axes, index)
        if start is not None:
            mask = _cut(mask, info.axes, start)
        args, kwargs = signature.rebuild(arrays)
        return evaluate_metric(
            model, params, args, kwargs, static_metric if metric is None else metric,
            {site_name: make_intervention(source, mask)}, logit_positions,
        )

    return cell


_make_cell_cached = functools.lru_cache(maxsize=512)(_make_cell)


def _cell_fn(*key):
    return _make_cell_cached(*key) if _hashable(*key) else _make_cell(*key)


def _is_pytree_metric(metric) -> bool:
    """Metrics registered as pytrees travel as jit arguments (no recompile per instance)."""
    return isinstance(metric, Metric) and not jax.tree_util.treedef_is_leaf(
        jax.tree.structure(metric))


# ---------------------------------------------------------------------------------------


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
    reuse: bool | None = None,
    position_blocks: int = DEFAULT_POSITION_BLOCKS,
) -> SweepResult:
    """Evaluate ``metric`` with one intervention per cell of a grid over ``site_name``.

    ``make_intervention(source, mask)`` builds each cell's intervention (default: patch
    ``source`` where the mask is 1); it must act elementwise (so a cell's intervention,
    sliced to a resumed run, is the resumed run's intervention). ``chunk_size`` cells run
    at once; by default as many as fit ``memory_budget`` bytes of activations. ``labels``
    name the entries of grid axes (e.g. ``{"pos": token_strings}``) for tables and plots.
    ``reuse=True`` skips work a cell cannot change (see the module docstring; the family
    needs the :class:`~mechinterp.family.Resumable` capability), ``reuse=False`` runs every cell from the input, and
    ``None`` reuses when that saves more than the extra compilations cost (see
    :data:`REUSE_FLOPS_PER_GROUP`);
    ``position_blocks`` groups positions for reuse. Errors (unknown site or axis, a source
    of the wrong shape, a metric that does not return a scalar) are raised before any
    compile.
    """
    model_kwargs = dict(model_kwargs or {})
    inputs = tuple(inputs)
    grid_axes = tuple(grid_axes)
    check_sweep_inputs(model, inputs, model_kwargs, metric, chunk_size)
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
    if not isinstance(position_blocks, int) or position_blocks < 1:
        raise ValueError(f"position_blocks must be a positive int, got {position_blocks!r}")
    grid_shape = tuple(info.shape[info.axes.index(axis)] for axis in grid_axes)
    selects = _selects_logits(model, metric)
    metric_arg, static_metric = (metric, None) if _is_pytree_metric(metric) else (None, metric)

    batch, seq_len = (tuple(np.shape(inputs[0])) + (1,))[:2]
    positions = np.asarray(metric.positions(batch, seq_len)) if selects else None
    signature, arrays = _CallSignature.of(inputs, model_kwargs)
    fn = _cell_fn(model, site_name, info, grid_axes, make_intervention, signature, None,
                  static_metric)
    shared = (params, source, arrays, metric_arg,
              None if positions is None else jnp.asarray(positions))
    probe = _once_per_shapes(_OUTPUT_SHAPES, jax.eval_shape, fn,
                             (jnp.zeros(len(grid_axes), jnp.int32), *shared))
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
    naive = len(cells) * _forward_flops(model, params, inputs, model_kwargs)
    groups = (_group_cells(cells, grid_axes, seq_len, int(positions.min()) if selects else 0,
                           position_blocks) if LAYER_AXIS in grid_axes else {})
    state = _resume_state(model, params, inputs, model_kwargs, info, grid_axes, reuse,
                          naive >= REUSE_FLOPS_PER_GROUP * len(groups))
    if state is None:
        runs = {None: (np.arange(len(cells)), fn, shared)}
    else:
        runs = {}
        for start, rows in groups.items():
            sub_model, sub_params, sub_kwargs = model.resume(params, state, *start)
            signature, arrays = _CallSignature.of((None,), sub_kwargs)
            sub_fn = _cell_fn(sub_model, site_name, info, grid_axes, make_intervention,
                              signature, start, static_metric)
            sub_positions = None if positions is None else jnp.asarray(positions - start[1])
            runs[start] = (rows, sub_fn, (sub_params, _cut(source, info.axes, start), arrays,
                                          metric_arg, sub_positions))

    values = np.zeros(len(cells), np.float32)
    flops = 0
    n_chunks = sum(-(-len(rows) // chunk_size) for rows, _, _ in runs.values())
    with tqdm(total=n_chunks, desc=f"patch {site_name}", disable=not progress,
              leave=False) as bar:
        for rows, cell, cell_shared in runs.values():
            values[rows], group_flops = _run_chunks(cell, cells[rows], cell_shared, chunk_size,
                                                    bar)
            flops += group_flops
    cost = dict(flops=int(flops), naive_flops=int(naive), groups=len(runs))
    return SweepResult(values.reshape(grid_shape), grid_axes, dict(labels or {}), cost)


def check_sweep_inputs(model, inputs, model_kwargs, metric, chunk_size) -> None:
    """What every sweep checks on its concrete inputs before compiling anything: token ids
    and mask (:func:`mechinterp.validate.check_model_inputs`), the metric's positions and
    answer ids against the batch, sequence length and vocabulary, ``chunk_size`` >= 1."""
    validate.check_positive_int(chunk_size, "chunk_size", allow_none=True)
    validate.check_model_inputs(model, inputs, model_kwargs)
    if isinstance(metric, Metric) and inputs and hasattr(inputs[0], "shape"):
        batch, seq_len = (tuple(np.shape(inputs[0])) + (1,))[:2]
        tokens, _ = validate.token_inputs(model, inputs, model_kwargs)
        vocab = model.vocab_size if tokens is not None else None
        metric.check(batch, seq_len, vocab)


def default_chunk_size(model, inputs, model_kwargs, memory_budget=DEFAULT_MEMORY_BUDGET) -> int:
    """How many forwards fit ``memory_budget`` bytes, counting every site's activation twice."""
    return max(1, memory_budget // _bytes_per_cell(model, inputs, model_kwargs))


# ---------------------------------------------------------------------------------------
# Running chunks with a cached jit(vmap(fn)).

_VMAPPED: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _jit_vmap(fn, n_shared: int):
    """``jit(vmap(fn))`` over the first argument, cached for as long as ``fn`` lives, so a
    cell function that is itself cached compiles once per shape."""
    per_fn = _VMAPPED.setdefault(fn, {})
    if n_shared not in per_fn:
        per_fn[n_shared] = jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * n_shared))
    return per_fn[n_shared]


def _balanced(n: int, chunk_size: int) -> int:
    """As many chunks as ``chunk_size`` gives, but equal: padding < 1 item per chunk."""
    return -(-n // -(-n // int(chunk_size)))


def _run_chunks(fn, items, shared, chunk_size, bar, count_flops=True):
    """``fn`` over ``items`` in equal padded chunks; returns (values, matmul FLOPs run, or
    ``None`` without ``count_flops``)."""
    n = len(jax.tree.leaves(items)[0])
    chunk_size = _balanced(n, chunk_size)
    run = _jit_vmap(fn, len(shared))
    outputs = []  # device arrays: no host sync between chunks
    for begin in range(0, n, chunk_size):
        size = min(chunk_size, n - begin)

        def take(leaf, begin=begin, size=size):
            chunk = leaf[begin:begin + size]
            return np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - size, 0)])

        chunk = jax.tree.map(take, items)
        outputs.append(run(chunk, *shared))
        bar.update(1)
    values = np.concatenate([np.asarray(out) for out in outputs])[:n]
    if not count_flops:
        return values, None
    return values, _once_per_shapes(_FLOPS, matmul_flops, run, (chunk, *shared)) * len(outputs)


# What tracing a function tells (its output shape, its FLOPs), kept per function and
# argument shapes for as long as the function lives, so a repeated sweep traces nothing.
_OUTPUT_SHAPES: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
_FLOPS: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _shape_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves)


def _once_per_shapes(store, trace, fn, args):
    """``trace(fn, *args)``, computed once per ``fn`` and shapes of ``args``."""
    per_fn = store.setdefault(fn, {})
    key = _shape_key(args)
    if key not in per_fn:
        per_fn[key] = trace(fn, *args)
    return per_fn[key]


@functools.lru_cache(maxsize=64)
def _forward_flops_cached(model, signature, params_key) -> int:
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature.specs]
    params = jax.tree.unflatten(params_key[0], [jax.ShapeDtypeStruct(s, d)
                                                for s, d in params_key[1]])

    def forward(params, arrays):
        args, kwargs = signature.rebuild(arrays)
        return model.apply({"params": params}, *args, **kwargs)

    return matmul_flops(forward, params, specs)


def _forward_flops(model, params, inputs, kwargs) -> int:
    """Matmul FLOPs of one plain forward (full logits at every position)."""
    signature, _ = _CallSignature.of(tuple(inputs), dict(kwargs))
    params_key = _shape_key(params)
    if _hashable(model, signature):
        return _forward_flops_cached(model, signature, params_key)
    return _forward_flops_cached.__wrapped__(model, signature, params_key)


def map_in_chunks(fn, items, shared, chunk_size: int, *, desc: str, progress: bool = True):
    """``np.stack([fn(item, *shared) for item in items])``, as ``jit(vmap(fn))`` over chunks.

    ``items`` is a pytree whose leaves share a leading axis; ``shared`` is passed unbatched
    (``in_axes=None``), so large operands are not copied per item. The last chunk is padded
    by repeating its final item, so every chunk has one shape and compiles once (per
    ``fn``: pass the same function object to reuse the compilation across calls).
    """
    validate.check_positive_int(chunk_size, "chunk_size")
    n = len(jax.tree.leaves(items)[0])
    if n == 0:
        raise ValueError(f"{desc}: nothing to run (no items)")
    n_chunks = -(-n // _balanced(n, chunk_size))
    with tqdm(total=n_chunks, desc=desc, disable=not progress, leave=False) as bar:
        return _run_chunks(fn, items, tuple(shared), chunk_size, bar, count_flops=False)[0]
