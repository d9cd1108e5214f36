"""The sweep engine: a grid of single-cell interventions as a few vmapped computations.

A grid names some axes of a site (e.g. ``("layer", "pos")`` of ``resid_pre``). Each cell is
an intervention whose mask is one-hot on those axes; cells run with ``jax.vmap`` over their
indices only, sharing the large operand (the source cache, ``in_axes=None``), in equal
chunks that fit a memory budget. A metric that names the logits it reads gets only those
(output selection, :mod:`mechinterp.family`).

Reuse (on by default where exact): a family with the resume protocol
(:class:`mechinterp.family.Resumable`) runs a cell from the cached residual stream at its
layer, for its positions only (a patch at layer ``l``, position ``p`` of a causal model
changes nothing below ``l`` or before ``p``). The start layer is a traced, unbatched
argument (chunks hold cells sorted by layer and start at their lowest), and positions come
in ``position_blocks`` windows of fixed width: one compilation per window, independent of
the number of layers and positions. Notes and cost: ``docs/analyses.md`` (sweeps).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mechinterp import sweep_cells, sweep_run, validate
from mechinterp.site_io import (SiteInfo, _CallSignature, _hashable, capture, intervene,
                                list_sites)
from mechinterp.family import Resumable, SelectsOutputs, has, require
from mechinterp.jaxpr_flops import matmul_flops
from mechinterp.interventions import Intervention
from mechinterp.metrics import Metric
from mechinterp.sweep_cells import POSITION_AXES
from mechinterp.sweep_mesh import grid_digest, placement
from mechinterp.sweep_result import SweepResult  # noqa: F401  (its public home)
from mechinterp.sweep_run import (OUTPUT_SHAPES, Runner, balanced, map_in_chunks,  # noqa: F401
                                  once_per_shapes, shape_key)

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of activations for one chunk of cells
DEFAULT_POSITION_BLOCKS = 4
# Each position block is one more compilation (about a second on a laptop CPU, the time of
# about 1e11 FLOPs): by default a grid gets one block per this many naive FLOPs (one full
# forward per cell), up to DEFAULT_POSITION_BLOCKS.
FLOPS_PER_POSITION_BLOCK = 1e11
# A resumed chunk starts at its lowest layer: it holds the cells of one layer, or more (so
# spanning layers) where that is fewer tokens than this; each call has a fixed cost.
MIN_CHUNK_TOKENS = 256
LAYER_AXIS = "layer"


def _selects_logits(model, metric) -> bool:
    return isinstance(metric, Metric) and has(model, SelectsOutputs)


def evaluate_metric(model, params, inputs, kwargs, metric, interventions,
                    logit_positions=None, read_site=None):
    """Run ``model`` with ``interventions`` and reduce its logits with ``metric``;
    ``read_site``: return ``(value, that site's activation)`` instead.

    A :class:`~mechinterp.metrics.Metric` on a family with output selection
    (:class:`~mechinterp.family.SelectsOutputs`) gets only the logits it reads (at
    ``logit_positions`` if given, else at the metric's own positions; only its ``columns``
    if it names some and the family selects columns); any other callable gets the full
    logits.
    """
    if isinstance(metric, Metric) and validate.is_concrete(inputs) and inputs and hasattr(
            inputs[0], "shape"):  # an eager call: check positions and answer ids
        check_sweep_inputs(model, tuple(inputs), kwargs, metric, None)
    reduce = metric
    if _selects_logits(model, metric):
        if logit_positions is None:
            batch, seq_len = inputs[0].shape[:2]
            logit_positions = metric.positions(batch, seq_len)
        columns = (metric.columns(logit_positions.shape[0])
                   if "columns" in model.selectable_outputs else None)
        kwargs = dict(kwargs, **model.output_selection(logit_positions, columns))
        reduce = metric.on_selected if columns is None else metric.on_columns
    if read_site is None:
        return reduce(intervene(model, params, *inputs, interventions=interventions, **kwargs))
    outputs, cache = capture(model, params, *inputs, sites=[read_site],
                             interventions=interventions, **kwargs)
    return reduce(outputs), cache[read_site]


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


def _bytes_per_resumed_cell(model, inputs, kwargs, selects) -> int:
    """What one cell of a resumed sweep holds at once: one layer's sites (layers run one
    after another) and the others (the logits only without output selection), twice."""
    total = 0
    for name, info in list_sites(model, *inputs, **kwargs).items():
        size = int(np.prod(info.shape)) * info.dtype.itemsize
        if info.axes and info.axes[0] == LAYER_AXIS:
            size //= info.shape[0]
        total += 0 if (selects and name == "logits") else size
    return 2 * total


# ---------------------------------------------------------------------------------------
# Resumed sweeps: cells by window of positions, chunks from their lowest layer.


def _cut(x, axes: Sequence[str], first_pos: int):
    """``x`` sliced ``[first_pos:]`` on its position axes (size-1 axes broadcast, stay)."""
    return x[tuple(slice(first_pos if axis in POSITION_AXES and size > 1 else 0, None)
                   for axis, size in zip(axes, x.shape))]


def _resume_state(model, params, inputs, model_kwargs, info, reuse):
    """The model's resume state if this grid can use it (``reuse`` not False), else
    ``None``; ``reuse=True`` where it cannot is an error."""
    if reuse is False:
        return None
    if not has(model, Resumable):
        if reuse:
            require(model, Resumable, "sweep(reuse=True) (pass reuse=False or None)")
        return None
    why = None
    if not info.axes or info.axes[0] != LAYER_AXIS:
        why = f"site {info.name!r} has no layer axis to start from"
    state = None if why else model.resume_state(params, *inputs, **model_kwargs)
    if state is None and why is None:
        why = f"{type(model).__name__}.resume_state returned None for these inputs"
    if state is None and reuse:
        raise ValueError(f"reuse=True, but {why}: pass reuse=False (or None to decide)")
    return state


# ---------------------------------------------------------------------------------------
# The cell function: one per (site, grid, call signature or window, metric type), cached
# across calls so a repeated sweep reuses its compilation. Every array is an argument.


_CELL_CACHES: list = []  # every cell_maker's cache, for clear_caches


def clear_caches() -> None:
    """Drop every cached cell function and compiled sweep program (and JAX's own caches).
    Each compiled CPU program holds memory mappings until it is freed; a long session that
    sweeps many models or shapes (a test suite, a notebook) can otherwise reach the
    kernel's limit on mappings, where XLA's compiler crashes."""
    for cache in _CELL_CACHES:
        cache.cache_clear()
    for store in (sweep_run._VMAPPED, sweep_run._EXECUTABLES, sweep_run.OUTPUT_SHAPES):
        store.clear()
    jax.clear_caches()


def cell_maker(make):
    """Cache the cell functions ``make`` builds, by its (hashable) arguments, so a repeated
    sweep gets the same function object and reuses its compilation; with an unhashable
    argument every call builds (and compiles) a new one. Every array is a cell argument."""
    cached = functools.lru_cache(maxsize=512)(make)
    _CELL_CACHES.append(cached)

    @functools.wraps(make)
    def get(*key):
        return cached(*key) if _hashable(*key) else make(*key)

    return get


@cell_maker
def _make_resumed_cell(model, site_name, info, grid_axes, make_intervention, first_pos,
                       static_metric):
    def cell(index, first_layer, params, state, source, metric, logit_positions):
        mask = _cut(grid_mask(info, grid_axes, index), info.axes, first_pos)
        tail, tail_params, kwargs = model.resume(params, state, first_layer, first_pos)
        return evaluate_metric(
            tail, tail_params, (None,), kwargs, static_metric if metric is None else metric,
            {site_name: make_intervention(_cut(source, info.axes, first_pos), mask)},
            logit_positions)

    return cell


@cell_maker
def _make_cell(model, site_name, info, grid_axes, make_intervention, signature,
               static_metric):
    def cell(index, params, source, arrays, metric, logit_positions):
        mask = grid_mask(info, grid_axes, index)
        args, kwargs = signature.rebuild(arrays)
        return evaluate_metric(
            model, params, args, kwargs, static_metric if metric is None else metric,
            {site_name: make_intervention(source, mask)}, logit_positions,
        )

    return cell


@cell_maker
def _make_unintervened(model, site_name, make_intervention, signature, static_metric):
    """``(metric value, changed, untouched)`` of the run on the inputs without
    interventions: which elements of the site the full-mask edit changes (bit for bit),
    and whether the zero-mask edit leaves every element as it is. One compiled program."""
    def unintervened(params, source, arrays, metric, logit_positions):
        args, kwargs = signature.rebuild(arrays)
        value, base = evaluate_metric(
            model, params, args, kwargs, static_metric if metric is None else metric, {},
            logit_positions, read_site=site_name)
        edited, untouched = (make_intervention(source, jnp.full(base.shape, m, jnp.float32))
                             .apply(base) for m in (1.0, 0.0))
        nan = jnp.isnan(base)  # NaN stays NaN under a zero mask, though NaN != NaN
        return value, edited != base, jnp.all((untouched == base) | (nan & jnp.isnan(untouched)))

    return jax.jit(unintervened)


def metric_argument(metric) -> tuple:
    """``(argument, static)``: a metric registered as a pytree travels as a jit argument (no
    recompile per instance); any other callable is part of the cell function."""
    return (metric, None) if _is_pytree_metric(metric) else (None, metric)


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
    position_blocks: int | None = None,
    skip_unchanged: bool = True,
    mesh=None,
    rules=None,
) -> SweepResult:
    """Evaluate ``metric`` with one intervention per cell of a grid over ``site_name``.

    ``make_intervention(source, mask)`` builds each cell's intervention (default: patch
    ``source`` where the mask is 1); it must act elementwise (so a cell's intervention,
    sliced to a resumed run, is the resumed run's intervention). ``chunk_size`` cells run
    at once; by default as many as keep a chunk's temporaries within ``memory_budget``
    bytes (checked on the compiled executable). ``labels`` name the entries of grid axes
    (e.g. ``{"pos": token_strings}``) for tables and plots. ``reuse`` (see the module
    docstring; the family needs :class:`~mechinterp.family.Resumable`): ``None`` reuses
    wherever that is exact, ``True`` demands it, ``False`` runs every cell from the input.
    ``position_blocks``: windows of positions for reuse (default: one per
    :data:`FLOPS_PER_POSITION_BLOCK` naive FLOPs, at most :data:`DEFAULT_POSITION_BLOCKS`).
    ``skip_unchanged`` (:mod:`mechinterp.sweep_cells`): one unintervened run finds the
    cells whose intervention changes no element of the site (bit for bit): they get that
    run's metric without running; resumed cells start at the first position they change.
    ``mesh`` (a :class:`jax.sharding.Mesh` or axis sizes such as ``{"data": -1}``) and
    ``rules`` (default ``DEFAULT_RULES``): cells split over the mesh axes of ``'batch'``,
    params sharded by their logical axes (:mod:`mechinterp.sweep_mesh`); the same values as
    without a mesh. Errors (unknown site or axis, a source of the wrong shape, a metric
    that does not return a scalar, a bad mesh) are raised before any compile.
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
    validate.check_positive_int(position_blocks, "position_blocks", allow_none=True)
    grid_shape = tuple(info.shape[info.axes.index(axis)] for axis in grid_axes)
    place = placement(mesh, rules)
    put = (lambda x, what: x) if place is None else place.replicate
    if place is not None:
        place.check_same_grid(site_name, grid_axes, grid_shape, reuse, position_blocks,
                              chunk_size, memory_budget,
                              grid_digest((*inputs, source), model_kwargs))
        params = place.params(model, params, inputs)
        source = put(source, "the source")
    selects = _selects_logits(model, metric)
    metric_arg, static_metric = metric_argument(metric)
    metric_arg = put(metric_arg, "the metric")

    batch, seq_len = (tuple(np.shape(inputs[0])) + (1,))[:2]
    positions = np.asarray(metric.positions(batch, seq_len)) if selects else None
    signature, arrays = _CallSignature.of(inputs, model_kwargs)
    fn = _make_cell(model, site_name, info, grid_axes, make_intervention,
                  signature, static_metric)
    shared = (params, source, put(arrays, "the inputs"), metric_arg,
              None if positions is None else put(jnp.asarray(positions), "positions"))
    probe = once_per_shapes(OUTPUT_SHAPES, jax.eval_shape, fn,
                            (jnp.zeros(len(grid_axes), jnp.int32), *shared))
    if probe.shape != ():
        raise ValueError(
            f"the patching metric must return a scalar, got shape {probe.shape}; reduce over "
            "the batch (e.g. .mean())"
        )

    cells = np.array(list(itertools.product(*map(range, grid_shape))), np.int32).reshape(
        -1, len(grid_axes)
    )
    naive = len(cells) * _forward_flops(model, params, inputs, model_kwargs)
    values = np.zeros(len(cells), np.float32)
    pos_axis = sweep_cells.position_axis(info)
    earliest = (cells[:, grid_axes.index(pos_axis)] if pos_axis in grid_axes
                else np.zeros(len(cells), np.int64))
    runner, baseline_s = Runner(None, place), 0.0
    if skip_unchanged:
        start = time.perf_counter()
        earliest, values[:] = sweep_cells.unintervened(
            runner, _make_unintervened(model, site_name, make_intervention, signature,
                                       static_metric), shared, info, grid_axes, cells)
        baseline_s = time.perf_counter() - start
    todo = np.flatnonzero(earliest >= 0)
    state = _resume_state(model, params, inputs, model_kwargs, info, reuse)
    if state is not None:
        state = put(state, "the resume state")
    if state is None:
        per_cell = _bytes_per_cell(model, inputs, model_kwargs)
        runs = [(todo, fn, shared, None, 0)] if len(todo) else []
    else:
        per_cell = _bytes_per_resumed_cell(model, inputs, model_kwargs, selects)
        if position_blocks is None:
            position_blocks = int(np.clip(naive // FLOPS_PER_POSITION_BLOCK, 1,
                                          DEFAULT_POSITION_BLOCKS))
        layer = grid_axes.index(LAYER_AXIS) if LAYER_AXIS in grid_axes else None
        runs = []
        for first_pos, rows in sweep_cells.windows(
                earliest[todo], seq_len, int(positions.min()) if selects else 0,
                position_blocks).items():
            rows = todo[rows]
            cell = _make_resumed_cell(model, site_name, info, grid_axes,
                            make_intervention, first_pos, static_metric)
            runs.append((rows, cell, (params, state, source, metric_arg, None if positions
                                      is None else put(jnp.asarray(positions - first_pos),
                                                       "positions")), layer,
                         batch * (seq_len - first_pos)))

    budget = None if chunk_size else memory_budget
    chunk_size = chunk_size or max(1, memory_budget // per_cell) * (place.ways if place else 1)
    n_layers = info.shape[0] if info.axes and info.axes[0] == LAYER_AXIS else 1
    n_chunks = sum(-(-len(rows) // balanced(len(rows), chunk_size)) for rows, *_ in runs)
    with tqdm(total=n_chunks, desc=f"patch {site_name}", disable=not progress,
              leave=False) as bar:
        runner.bar = bar
        for rows, cell, cell_shared, layer, tokens in runs:
            first_of = None if state is None else (
                (lambda chunk: 0) if layer is None else (lambda chunk: chunk[:, layer].min()))
            size = chunk_size
            if budget is not None and layer is not None:  # one layer, or MIN_CHUNK_TOKENS
                per_layer = -(-len(rows) // len(np.unique(cells[rows, layer])))
                size = min(size, max(per_layer, -(-MIN_CHUNK_TOKENS // tokens)))
            values[rows] = runner.chunks(
                cell, cells[rows], cell_shared, size, first_of=first_of, budget=budget,
                layer_flops=lambda first: (n_layers - first) / n_layers)
    cost = dict(flops=int(runner.flops), naive_flops=int(naive),
                skipped=len(cells) - len(todo), baseline_s=baseline_s, groups=len(runs),
                chunks=runner.calls, compiles=runner.compiles, compile_s=runner.compile_s,
                run_s=runner.run_s, peak_bytes=int(runner.peak_bytes),
                device_flops=runner.device_flops, devices=place.ways if place else 1)
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


@functools.lru_cache(maxsize=64)
def _forward_flops_cached(model, signature, params_key) -> int:
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature.specs]
    params = jax.tree.unflatten(params_key[0], [jax.ShapeDtypeStruct(s, d)
                                                for s, d, _ in params_key[1]])

    def forward(params, arrays):
        args, kwargs = signature.rebuild(arrays)
        return model.apply({"params": params}, *args, **kwargs)

    return matmul_flops(forward, params, specs)


def _forward_flops(model, params, inputs, kwargs) -> int:
    """Matmul FLOPs of one plain forward (full logits at every position)."""
    signature, _ = _CallSignature.of(tuple(inputs), dict(kwargs))
    params_key = shape_key(params)
    if _hashable(model, signature):
        return _forward_flops_cached(model, signature, params_key)
    return _forward_flops_cached.__wrapped__(model, signature, params_key)
