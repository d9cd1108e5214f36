"""Time series shipped with statsmodels as windowed forecasting examples (a tfds dataset).

A series (``SERIES``; nothing downloaded) of ``T`` steps is cut at
``split = T - round(test_fraction * T)``. An example is a ``context`` window followed by
a ``horizon`` target, every ``stride`` steps: train windows lie wholly before ``split``,
test windows have their whole target after it. Values are normalized per column with the
train period's mean and std only (:func:`normalization`); missing values are filled by
linear interpolation.

Features: ``context`` (float32, ``(context, C)``), ``target`` (float32,
``(horizon, C)``), ``start`` (int32). Key names: :class:`TimeSeries`,
:func:`build_timeseries`, :func:`load_series`, :func:`window_starts`.

Design notes: docs/training.md ("Time series").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds
from mechinterp.train.data import _config_name, prepare


def _statsmodels_frame(name: str) -> pd.DataFrame:
    import statsmodels.api as sm  # imported on use: it is slow to import

    return getattr(sm.datasets, name).load_pandas().data


# name -> columns that are calendar labels, not values (dropped)
SERIES: dict[str, tuple[str, ...]] = {
    "sunspots": ("YEAR",),  # yearly sunspot activity, 1700-2008
    "nile": ("year",),  # yearly Nile flow at Aswan, 1871-1970
    "co2": (),  # weekly Mauna Loa CO2, 1958-2001
    "macrodata": ("year", "quarter"),  # quarterly US macroeconomic series, 1959-2009
}


def load_series(name: str, columns: Sequence[str] | None = None
                ) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(values (T, C) float64, column names)`` of a statsmodels series; ``columns``
    picks some (default: all value columns). Gaps are linearly interpolated."""
    if name not in SERIES:
        raise ValueError(f"unknown series {name!r}; choose one of {sorted(SERIES)}")
    frame = _statsmodels_frame(name).drop(columns=list(SERIES[name]))
    if columns is not None:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown or not columns:
            raise ValueError(f"series {name!r} has no columns {unknown or '(none given)'}; "
                             f"its columns are {list(frame.columns)}")
        frame = frame[list(columns)]
    frame = frame.astype(np.float64).interpolate(method="linear", limit_direction="both")
    return frame.to_numpy(), tuple(frame.columns)


def split_point(length: int, test_fraction: float) -> int:
    """The first time step of the test period."""
    return length - round(test_fraction * length)


def window_starts(length: int, split: int, *, context: int, horizon: int, stride: int
                  ) -> dict[str, np.ndarray]:
    """Start ``s`` of every train and test window (see the module docstring)."""
    window = context + horizon
    return {"train": np.arange(0, split - window + 1, stride),
            "test": np.arange(split - context, length - window + 1, stride)}


@dataclasses.dataclass(eq=False)
class TimeSeriesConfig(tfds.core.BuilderConfig):
    """Which series and columns, the window sizes, the stride and the test fraction."""

    series: str = "sunspots"
    columns: tuple[str, ...] | None = None
    context: int = 16
    horizon: int = 1
    stride: int = 1
    test_fraction: float = 0.2


class TimeSeries(tfds.core.GeneratorBasedBuilder):
    """The windowed series of the module docstring (one config directory per setting)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    code_path = None  # nothing to download, no checksums file (see data.SyntheticTasks)

    def _load(self):
        c = self.builder_config
        values, columns = load_series(c.series, c.columns)
        split = split_point(len(values), c.test_fraction)
        mean, std = values[:split].mean(0), values[:split].std(0)
        return values, columns, split, mean, std

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        _, columns, split, mean, std = self._load()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"statsmodels {c.series} {columns}: windows of {c.context} -> "
                        f"{c.horizon}, split by time at step {split}",
            features=tfds.features.FeaturesDict({
                "context": tfds.features.Tensor(shape=(c.context, len(columns)),
                                                dtype=np.float32),
                "target": tfds.features.Tensor(shape=(c.horizon, len(columns)),
                                               dtype=np.float32),
                "start": np.int32,
            }),
            metadata=tfds.core.MetadataDict(columns=list(columns), split=split,
                                            mean=mean.tolist(), std=std.tolist()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        values, _, split, mean, std = self._load()
        normalized = (values - mean) / std
        starts = window_starts(len(values), split, context=c.context, horizon=c.horizon,
                               stride=c.stride)
        return {name: self._generate_examples(normalized, s) for name, s in starts.items()}

    def _generate_examples(self, normalized: np.ndarray, starts: np.ndarray):
        c = self.builder_config
        for s in starts:
            end = s + c.context
            yield int(s), {"context": normalized[s:end].astype(np.float32),
                           "target": normalized[end:end + c.horizon].astype(np.float32),
                           "start": np.int32(s)}


def _check(values: np.ndarray, *, context: int, horizon: int, stride: int,
           test_fraction: float) -> None:
    if min(context, horizon, stride) < 1:
        raise ValueError(f"context, horizon and stride must be >= 1, got {context}, "
                         f"{horizon}, {stride}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    length, window = len(values), context + horizon
    split = split_point(length, test_fraction)
    if split < window or length - split < horizon:
        raise ValueError(
            f"a series of {length} steps split at {split} has no room for a train window "
            f"of {window} steps and a test target of {horizon}; shorten context/horizon "
            f"or change test_fraction")
    flat = np.flatnonzero(values[:split].std(0) == 0)
    if len(flat):
        raise ValueError(f"columns {flat.tolist()} are constant in the train period; "
                         "they cannot be normalized")


def build_timeseries(series: str, *, data_dir: str | Path, columns: Sequence[str] | None = None,
                     context: int = 16, horizon: int = 1, stride: int = 1,
                     test_fraction: float = 0.2) -> TimeSeries:
    """Generate (once) and return the windowed dataset for these settings."""
    values, columns = load_series(series, columns)
    _check(values, context=context, horizon=horizon, stride=stride, test_fraction=test_fraction)
    config = TimeSeriesConfig(
        name=_config_name("timeseries", series, columns, context, horizon, stride,
                          test_fraction),
        series=series, columns=columns, context=context, horizon=horizon, stride=stride,
        test_fraction=test_fraction)
    return prepare(TimeSeries, config, data_dir)


def normalization(builder: TimeSeries) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` per column, of the train period, as used to normalize."""
    meta = builder.info.metadata
    return np.asarray(meta["mean"]), np.asarray(meta["std"])
