"""Which cells of a sweep change anything, from where, and the windows of positions they run.

A cell's intervention (``make_intervention(source, one-hot mask)``, elementwise) changes the
site only where its mask is 1 *and* the full-mask edit of the unintervened activation
differs from it, bit for bit. A cell that changes no element is a no-op: the model runs
exactly as without it, so its value is the unintervened run's metric and it is not run.
In an indirect-object pair that differs in one token, every position before that token
holds the same activation in the clean and the corrupted run, so patching there is such a
no-op (TransformerLens runs those cells anyway). In a causal model a cell that changes
positions from ``p`` on changes nothing before ``p`` at any layer, so a resumed run
(:class:`mechinterp.family.Resumable`) starts at ``p``, reading the earlier positions
from the cache of the unintervened run.
"""

from __future__ import annotations

import numpy as np

from mechinterp.site_io import SiteInfo

POSITION_AXES = ("pos", "query_pos")  # a patch there changes this position and later ones


def position_axis(info: SiteInfo) -> str | None:
    return next((axis for axis in info.axes or () if axis in POSITION_AXES), None)


def first_changes(changed: np.ndarray, info: SiteInfo, grid_axes: tuple[str, ...],
                  cells: np.ndarray) -> np.ndarray:
    """Per cell (rows of ``cells``, grid order): the first position at which its one-hot
    mask meets ``changed`` (a boolean of the site's shape), 0 for a site without positions,
    -1 where it meets nothing."""
    axes = tuple(info.axes)
    pos = position_axis(info)
    order = [axes.index(axis) for axis in grid_axes]
    along = pos is not None and pos not in grid_axes
    if along:
        order.append(axes.index(pos))
    order += [d for d in range(len(axes)) if d not in order]
    per_cell = np.transpose(changed, order).reshape(
        len(cells), changed.shape[axes.index(pos)] if along else 1, -1).any(-1)
    first = np.where(per_cell.any(1), per_cell.argmax(1), -1)
    if pos in grid_axes:
        first = np.where(first >= 0, cells[:, grid_axes.index(pos)], -1)
    return first


def unintervened(runner, run, shared, info, grid_axes, cells) -> tuple[np.ndarray, float]:
    """``(first, baseline)``: :func:`first_changes` of every cell and the metric value of the
    unintervened run ``run(*shared)`` (jitted: the metric value, the elements the full-mask
    edit changes, and whether the zero-mask edit changes none), compiled and counted by
    ``runner`` (:class:`mechinterp.sweep_run.Runner`) like the cells."""
    baseline, changed, untouched = runner.run_once(run, shared)
    if not bool(untouched):
        raise ValueError(
            f"make_intervention(source, mask) changes site {info.name!r} where the mask is 0: "
            "a sweep's intervention must act only where its mask is 1 (build it with the "
            "mask, e.g. Intervention.patch(source, mask))")
    return first_changes(np.asarray(changed), info, grid_axes, cells), float(baseline)


def windows(earliest: np.ndarray, seq_len: int, last_first_pos: int, position_blocks: int
            ) -> dict[int, np.ndarray]:
    """``{first_pos: rows}``: cells run positions ``[first_pos:]``, with ``first_pos`` the
    start of the block holding the cell's ``earliest`` changed position; the
    ``position_blocks`` blocks split ``[min(earliest), seq_len)`` evenly, and no window
    starts after ``last_first_pos`` (the first position the metric reads, or 0 when it reads
    them all). Rows stay in order, so sorted by layer when the layer axis comes first."""
    first = np.zeros(len(earliest), np.int64)
    if len(earliest) and last_first_pos > 0:
        lowest = int(earliest.min())
        starts = np.unique([lowest + (seq_len - lowest) * b // position_blocks
                            for b in range(position_blocks)])
        first = starts[np.searchsorted(starts, earliest, side="right") - 1]
        first = np.minimum(first, last_first_pos)
    return {int(p): np.flatnonzero(first == p) for p in np.unique(first)}
