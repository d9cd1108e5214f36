"""Forecasting examples for the time-series families: synthetic series of known kind and
frequency regime, regular patch windows, and irregular subsampling with missing values.

:func:`synthetic_series` draws series of a kind in ``KINDS`` (sinusoids in the ``low``,
``mid`` or ``high`` frequency regime of ``REGIMES``, ``trend`` or ``random_walk``);
:func:`real_series` reads the statsmodels series through :mod:`mechinterp.train.timeseries`
(``split_point`` separates train and test periods). :func:`regular_windows` cuts windows
and normalises each by its context; :func:`irregular_examples` keeps ``n_context`` random
observation times of the context (normalised to [0, 1)), marks a share missing, and draws
``n_target`` future target times. Key names: :func:`synthetic_series`, :func:`real_series`,
:func:`regular_windows`, :func:`irregular_examples`.
"""

from __future__ import annotations

import numpy as np

from mechinterp.train.timeseries import load_series, split_point

#: frequency regimes: cycles per time step, drawn uniformly in the range
REGIMES = {"low": (1 / 40, 1 / 20), "mid": (1 / 12, 1 / 7), "high": (1 / 4.5, 1 / 3)}
KINDS = (*REGIMES, "trend", "random_walk")
#: statsmodels series (and columns) used as real data, with their seasonal period in steps
REAL = {"sunspots": (None, 11), "nile": (None, 1), "co2": (None, 52),
        "macrodata": (("realgdp", "cpi", "unemp", "infl"), 4)}


def synthetic_series(rng: np.random.Generator, kind: str, n: int, length: int) -> np.ndarray:
    """(n, length) float64 series of one kind: a regime's sinusoid (random frequency, phase,
    a weaker second harmonic) plus noise, a noisy linear trend, or a Gaussian random walk."""
    t = np.arange(length)[None]
    noise = 0.1 * rng.standard_normal((n, length))
    if kind in REGIMES:
        f = rng.uniform(*REGIMES[kind], size=(n, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(n, 2))
        return (np.sin(2 * np.pi * f * t + phase[:, :1])
                + 0.3 * np.sin(4 * np.pi * f * t + phase[:, 1:]) + noise)
    if kind == "trend":
        return rng.normal(0, 0.05, (n, 1)) * t + rng.normal(0, 1, (n, 1)) + noise
    if kind == "random_walk":
        return np.cumsum(0.3 * rng.standard_normal((n, length)), axis=1)
    raise ValueError(f"unknown series kind {kind!r}; choose one of {KINDS}")


def real_series(names=tuple(REAL), test_fraction: float = 0.2
                ) -> dict[str, tuple[np.ndarray, int]]:
    """``{name: (values (T,), split)}`` for every column of the ``REAL`` series ``names``
    (``macrodata/cpi``...); ``split`` is the first test step."""
    unknown = sorted(set(names) - set(REAL))
    if unknown:
        raise ValueError(f"unknown real series {unknown}; choose from {sorted(REAL)}")
    out = {}
    for name in names:
        columns = REAL[name][0]
        values, names = load_series(name, columns)
        for j, col in enumerate(names):
            key = name if values.shape[1] == 1 else f"{name}/{col}"
            out[key] = (values[:, j], split_point(len(values), test_fraction))
    return out


def season_of(name: str) -> int:
    return REAL[name.split("/")[0]][1]


def window_starts(length: int, split: int, window: int, horizon: int, part: str,
                  stride: int) -> np.ndarray:
    """Starts of windows wholly before ``split`` (``part="train"``) or whose last
    ``horizon`` steps lie after it (``"test"``)."""
    if part == "train":
        return np.arange(0, split - window + 1, stride)
    return np.arange(max(0, split - window + horizon), length - window + 1, stride)


def normalise(windows: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(normalised, mean, std)``: each window minus its context mean, over its context
    std (at least 1e-3 of the window's scale, so flat contexts do not blow up)."""
    mean = windows[:, :context].mean(1, keepdims=True)
    std = windows[:, :context].std(1, keepdims=True)
    std = np.maximum(std, 1e-3 * (np.abs(windows).max(1, keepdims=True) + 1e-8))
    return (windows - mean) / std, mean, std


def regular_windows(values: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """(len(starts), window) windows of a 1-d series."""
    if len(values) < window:
        raise ValueError(f"a series of {len(values)} steps has no window of {window}")
    return np.stack([values[s:s + window] for s in starts]) if len(starts) else np.zeros(
        (0, window))


def irregular_examples(rng: np.random.Generator, windows: np.ndarray, *, context: int,
                       n_context: int, n_target: int, missing: float = 0.0,
                       target_offset: int = 0) -> dict:
    """Irregular forecasting examples from dense windows (n, context + horizon).

    Per window: ``n_context`` sorted distinct steps of the context (the last context step
    always kept), ``n_target`` sorted distinct steps of the horizon; times are step /
    ``context``; values are normalised by the kept context values; a ``missing`` share of
    context observations (never the last) get ``observed = 0`` and value 0. Returns
    ``values``, ``times``, ``observed`` (n, n_context) and ``target_times``, ``targets``
    (n, n_target), float32.
    """
    n, window = windows.shape
    horizon = window - context - target_offset
    if not (2 <= n_context <= context and 1 <= n_target <= horizon):
        raise ValueError(f"n_context={n_context} must be in [2, context={context}] and "
                         f"n_target={n_target} in [1, horizon={horizon}]")
    if not 0.0 <= missing < 1.0:
        raise ValueError(f"missing must be in [0, 1), got {missing}")
    ctx = np.stack([np.sort(np.append(rng.choice(context - 1, n_context - 1, replace=False),
                                      context - 1)) for _ in range(n)])
    tgt = np.stack([np.sort(rng.choice(horizon, n_target, replace=False)) + context
                    + target_offset for _ in range(n)])
    rows = np.arange(n)[:, None]
    values, targets = windows[rows, ctx], windows[rows, tgt]
    observed = (rng.random(ctx.shape) >= missing).astype(np.float64)
    observed[:, -1] = 1.0
    mean = (values * observed).sum(1, keepdims=True) / observed.sum(1, keepdims=True)
    var = ((values - mean) ** 2 * observed).sum(1, keepdims=True) / observed.sum(1, keepdims=True)
    std = np.maximum(np.sqrt(var), 1e-3 * (np.abs(values).max(1, keepdims=True) + 1e-8))
    f32 = np.float32
    return {"values": ((values - mean) / std * observed).astype(f32),
            "times": (ctx / context).astype(f32), "observed": observed.astype(f32),
            "target_times": (tgt / context).astype(f32),
            "targets": ((targets - mean) / std).astype(f32)}
