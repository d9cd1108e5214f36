"""One plotting set-up: matplotlib on the Agg backend with one style, and a context that
saves and closes the figure.

    with figure(workdir / "loss.png", 1, 2, figsize=(8, 3)) as (fig, axes):
        axes[0].plot(...)
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

STYLE = {"figure.dpi": 90, "savefig.dpi": 90, "font.size": 8, "axes.titlesize": 9,
         "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False}


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@contextlib.contextmanager
def figure(path: str | Path, *subplots_args, **subplots_kwargs):
    """Yield ``(fig, axes)`` from ``plt.subplots(...)`` under :data:`STYLE`; on exit the
    figure is laid out, saved as ``path`` (PNG) and closed (also on error)."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(*subplots_args, **subplots_kwargs)
        try:
            yield fig, axes
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)
