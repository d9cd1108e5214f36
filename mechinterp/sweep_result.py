"""The result of a sweep: metric values over a grid, with axis names, labels and cost."""

from __future__ import annotations

import dataclasses
import json

import numpy as np


@dataclasses.dataclass
class SweepResult:
    """Metric values over a grid, with axis names and per-axis labels.

    ``np.asarray(result)`` gives the values; :meth:`to_pandas` a long-form DataFrame.
    ``cost`` (when the sweep engine produced it): ``flops``, the matmul FLOPs executed
    (padding included; skipped layers left out; with ``skip_unchanged``, the one
    unintervened forward included), ``naive_flops``, those of one full forward with full
    logits per cell (how TransformerLens evaluates a grid), ``skipped``, the cells not run
    because their intervention changes nothing, ``baseline_s``, the time of the
    unintervened run that found them (its compilation included), ``groups``, the
    computations run, ``chunks``, their calls, ``compiles`` and ``compile_s`` (0 when every
    compilation was cached: trace, lower and compile; the unintervened run's included),
    ``run_s``, and ``peak_bytes``, the
    most an executable holds (arguments, outputs, temporaries: XLA's memory analysis; the
    unintervened run's included), per device; ``devices``, how many ways the cells were
    split, and ``device_flops``, XLA's FLOP count of what one device ran (its share of the
    cells, all operations).
    """

    values: np.ndarray
    axes: tuple[str, ...]
    labels: dict[str, list] = dataclasses.field(default_factory=dict)
    cost: dict[str, float] | None = None

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
