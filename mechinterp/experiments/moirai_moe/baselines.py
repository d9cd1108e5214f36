"""Statistical baselines on normalised windows: seasonal naive, ARIMA(1,1,1) and damped
additive-trend ETS (seasonal when two periods fit in the context), from statsmodels."""

from __future__ import annotations

import warnings

import numpy as np


def seasonal_naive(context: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """Repeat the last season (the last value when ``season`` is 1 or longer than the
    context)."""
    m = season if 1 < season <= context.shape[-1] else 1
    last = context[..., -m:]
    return np.concatenate([last] * (horizon // m + 1), axis=-1)[..., :horizon]


def _arima(x: np.ndarray, horizon: int) -> np.ndarray:
    from statsmodels.tsa.arima.model import ARIMA
    return ARIMA(x, order=(1, 1, 1)).fit().forecast(horizon)


def _ets(x: np.ndarray, horizon: int, season: int) -> np.ndarray:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing
    seasonal = 1 < season and 2 * season <= len(x)
    model = ExponentialSmoothing(x, trend="add", damped_trend=True,
                                 seasonal="add" if seasonal else None,
                                 seasonal_periods=season if seasonal else None)
    return model.fit().forecast(horizon)


def forecasts(contexts: np.ndarray, horizon: int, season: int) -> dict[str, np.ndarray]:
    """``{method: (n, horizon)}`` for contexts (n, context); a fit that fails falls back
    to the seasonal naive forecast (counted in ``failed``)."""
    naive = seasonal_naive(contexts, horizon, season)
    out = {"seasonal_naive": naive, "arima": naive.copy(), "ets": naive.copy()}
    failed = {"arima": 0, "ets": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, x in enumerate(contexts.astype(np.float64)):
            for name, fn in (("arima", lambda x: _arima(x, horizon)),
                             ("ets", lambda x: _ets(x, horizon, season))):
                try:
                    y = np.asarray(fn(x))
                    if np.all(np.isfinite(y)):
                        out[name][i] = y
                        continue
                except (ValueError, np.linalg.LinAlgError):
                    pass
                failed[name] += 1
    out["failed"] = failed
    return out
