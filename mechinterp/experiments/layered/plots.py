"""Image grids of layered experiments: RGBA layers are shown over a grey checkerboard."""

from __future__ import annotations

import numpy as np


def checker(size: int) -> np.ndarray:
    i, j = np.mgrid[:size, :size] // max(1, size // 8)
    return np.repeat((0.45 + 0.15 * ((i + j) % 2))[..., None], 3, -1)


def show(image) -> np.ndarray:
    """An RGB image to draw: RGB as is, RGBA over the checkerboard, (H, W) as grey."""
    x = np.asarray(image, np.float64)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, -1)
    if x.shape[-1] == 4:
        a = x[..., 3:]
        x = x[..., :3] * a + checker(x.shape[0]) * (1 - a)
    return np.clip(x, 0, 1)


def image_grid(r, name: str, columns: dict, n_rows: int) -> None:
    """``columns``: ``{title: (n, H, W[, C]) images}``; the first ``n_rows`` of each, one
    row per example, saved by the run folder ``r`` as ``name``."""
    titles = list(columns)
    with r.figure(name, n_rows, len(titles), figsize=(1.1 * len(titles), 1.1 * n_rows),
                  squeeze=False) as (_, axes):
        for col, title in enumerate(titles):
            for row in range(n_rows):
                ax = axes[row, col]
                ax.imshow(show(columns[title][row]), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=6)
