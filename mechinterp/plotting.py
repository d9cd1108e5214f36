"""Heatmaps (PNG) of 2-D sweep results, labelled by axis and entry."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechinterp.sweep import SweepResult  # noqa: E402


def heatmap(result: SweepResult, path, title: str | None = None, center: bool = True) -> Path:
    """Save a heatmap of a 2-D ``result`` (rows: first axis, columns: second) as PNG.

    ``center`` uses a diverging colour map symmetric around 0 (for effects that can have
    either sign). Labels come from ``result.labels`` when present, else indices. An axis
    without entries, labels of the wrong length, or no finite value is a ``ValueError``
    naming the axis (no blank picture).
    """
    values = np.asarray(result.values, dtype=float)
    if values.ndim != 2:
        raise ValueError(
            f"heatmap needs a 2-D result, got axes {result.axes} with shape {values.shape}; "
            "index or average the extra axes first"
        )
    rows, cols = result.axes
    for axis, size in zip(result.axes, values.shape):
        labels = result.labels.get(axis)
        if size == 0:
            raise ValueError(f"heatmap: axis {axis!r} has no entries (result shape "
                             f"{values.shape}, axes {result.axes}): nothing to plot")
        if labels is not None and len(labels) != size:
            raise ValueError(f"heatmap: axis {axis!r} has {size} entries but "
                             f"{len(labels)} labels ({list(labels)[:8]})")
    if not np.isfinite(values).any():
        raise ValueError(f"heatmap: every value of the {values.shape} result is NaN or inf; "
                         "nothing to plot (was the sweep run on a diverged model?)")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * values.shape[1] + 2),
                                    max(3.0, 0.35 * values.shape[0] + 1.5)))
    if center:
        limit = float(np.max(np.abs(values[np.isfinite(values)]))) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    for axis, labels, set_ticks, set_labels in (
        (cols, result.labels.get(cols), ax.set_xticks, ax.set_xticklabels),
        (rows, result.labels.get(rows), ax.set_yticks, ax.set_yticklabels),
    ):
        if labels is not None:
            set_ticks(range(len(labels)))
            set_labels([str(label) for label in labels],
                       rotation=90 if axis == cols else 0, fontsize=8)
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
