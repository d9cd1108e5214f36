"""A synthetic multi-view crop-type task: optical, radar and weather time series.

Each field is one of :data:`CLASSES`; its greenness over a season of ``length`` steps is a
double logistic ``base + amp * (s((t - sos) / 0.04) - s((t - eos) / 0.05))`` whose class
parameters (:data:`CLASSES`) are jittered per field and shifted by the field's climate zone
(warmer: earlier). Views: ``optical`` (red, NIR, SWIR, NDVI from greenness, noise; clouded
steps are NaN: missing), ``radar`` (VV, VH in dB: biomass, flooding for rice, speckle;
radar sees through clouds) and ``weather`` (temperature and rain of the field's zone).
Class pairs are built to need different views: maize/soy/sorghum differ mildly in optical
timing, rice looks like maize except for radar flooding, sorghum mostly grows in the
hot-dry zone (weather). :class:`CropViews` is a grain random-access source (numpy
records); :func:`model_inputs` fills missing values and appends an observed-mask channel;
:func:`label_budget` picks ``n`` labelled fields per class (limited-label regimes).
"""

from __future__ import annotations

import numpy as np

# name: (base, amp, sos, eos, flooded, zone probabilities (wet, temperate, hot-dry))
CLASSES: dict[str, tuple] = {
    "non-crop": (0.45, 0.15, 0.20, 0.85, False, (1 / 3, 1 / 3, 1 / 3)),
    "wheat": (0.10, 0.70, 0.12, 0.45, False, (0.2, 0.6, 0.2)),
    "maize": (0.10, 0.80, 0.40, 0.75, False, (0.3, 0.5, 0.2)),
    "rice": (0.08, 0.78, 0.42, 0.76, True, (0.7, 0.2, 0.1)),
    "soy": (0.10, 0.65, 0.45, 0.75, False, (0.3, 0.5, 0.2)),
    "sorghum": (0.10, 0.72, 0.40, 0.72, False, (0.1, 0.2, 0.7)),
}
ZONES = ((18.0, 5.0, 8.0, -0.03), (12.0, 10.0, 3.0, 0.0), (26.0, 6.0, 1.0, -0.05))
# zone: (mean temperature, seasonal amplitude, mean rain, phenology shift)
VIEWS = ("optical", "radar", "weather")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class CropViews:
    """``n`` fields drawn with ``seed``: a random-access source, ``source[i]`` is
    ``{"optical", "radar", "weather": (length, channel) float32, "label": int32}``.
    ``cloud`` is the mean fraction of clouded optical steps (per field Beta-distributed)."""

    def __init__(self, n: int, *, seed: int, length: int = 24, cloud: float = 0.3):
        if n < 1 or length < 4:
            raise ValueError(f"need n >= 1 fields and length >= 4 steps, got {n}, {length}")
        if not 0.0 <= cloud < 1.0:
            raise ValueError(f"cloud is a mean fraction of clouded steps in [0, 1), got {cloud}")
        rng = np.random.default_rng(seed)
        params = list(CLASSES.values())
        labels = rng.integers(len(params), size=n)
        zones = np.array([rng.choice(3, p=params[c][5]) for c in labels])
        base, amp, sos, eos = (np.array([params[c][i] for c in labels]) for i in range(4))
        shift = np.array([ZONES[z][3] for z in zones]) + rng.normal(0, 0.03, n)
        amp = amp * rng.uniform(0.85, 1.15, n)
        t = np.linspace(0, 1, length)[None]
        green = base[:, None] + amp[:, None] * (
            _sigmoid((t - (sos + shift)[:, None]) / 0.04)
            - _sigmoid((t - (eos + shift)[:, None]) / 0.05))
        noise = lambda sd, *shape: rng.normal(0, sd, (n, length) + shape)  # noqa: E731
        red, nir, swir = 0.15 - 0.1 * green, 0.2 + 0.4 * green, 0.3 - 0.15 * green
        optical = np.stack([red, nir, swir, (nir - red) / (nir + red)], -1) + noise(0.02, 4)
        p_cloud = rng.beta(2, 2 * (1 - cloud) / max(cloud, 1e-3), n) if cloud else np.zeros(n)
        optical[rng.uniform(size=(n, length)) < p_cloud[:, None]] = np.nan
        flooded = np.array([params[c][4] for c in labels])[:, None]
        water = flooded * np.exp(-(((t - (sos + shift)[:, None] + 0.08) / 0.05) ** 2))
        vv = -14 + 6 * green - 8 * water
        vh = -20 + 8 * green - 6 * water
        radar = np.stack([vv, vh], -1) + noise(2.5, 2)
        mean_t, amp_t, rain = (np.array([ZONES[z][i] for z in zones])[:, None] for i in range(3))
        season = np.sin(2 * np.pi * (t - 0.25))
        weather = np.stack([mean_t + amp_t * season, rain * (1 + 0.5 * season)], -1)
        weather = weather + noise(1.5, 2)
        self.arrays = {"optical": optical, "radar": radar, "weather": weather}
        self.arrays = {k: v.astype(np.float32) for k, v in self.arrays.items()}
        self.labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.arrays.items()}, "label": self.labels[i]}


def standardize(train: dict, *others: dict) -> list[dict]:
    """Each view of ``train`` and ``others`` scaled per channel by ``train``'s mean and
    std over fields and time (missing values ignored)."""
    stats = {k: (np.nanmean(v, (0, 1)), np.nanstd(v, (0, 1))) for k, v in train.items()}
    return [{k: ((v - stats[k][0]) / stats[k][1]).astype(np.float32) for k, v in d.items()}
            for d in (train, *others)]


def model_inputs(arrays: dict) -> list[np.ndarray]:
    """The views in :data:`VIEWS` order as model inputs: the optical view (the one with
    clouds) gets missing values replaced by 0 and one more channel, 1 where observed."""
    out = []
    for name in VIEWS:
        v = arrays[name]
        if name == "optical":
            observed = ~np.isnan(v).any(-1, keepdims=True)
            v = np.concatenate([np.nan_to_num(v), observed.astype(np.float32)], -1)
        out.append(v)
    return out


def label_budget(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` fields of every class (a seeded choice)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=len(CLASSES))
    if counts.min() < per_class:
        raise ValueError(f"{per_class} labels per class asked, but a class has only "
                         f"{counts.min()} fields; draw more fields or lower the budget")
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class,
                                              replace=False) for c in range(len(CLASSES))]))
