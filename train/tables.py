"""Real tables that ship inside packages, as (column names, standardized values), and a
fixed embedding of column-name strings.

Pretraining tables: numeric columns of statsmodels' data sets (:data:`PRETRAIN`; rows with
missing values dropped, at most ``max_rows`` rows sampled). Downstream tables:
scikit-learn's iris, wine, breast cancer (classification) and diabetes (regression), with
their feature names as column names. Values are standardized per column (median / IQR-scaled
z-scores, clipped to [-5, 5]). Column names are embedded by :func:`name_embedding`, a
fastText-like bag of hashed character trigrams and words (each hashed to a fixed Gaussian
vector, averaged, normalized): it needs no download and gives similar names similar
vectors; TARTE uses a pretrained language model's string embeddings instead.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import zlib

import numpy as np

PRETRAIN = ("star98", "fair", "grunfeld", "randhie", "ccard", "modechoice", "statecrime",
            "anes96", "macrodata", "interest_inflation", "elnino", "heart", "danish_data")
DOWNSTREAM = {"iris": "classification", "wine": "classification",
              "breast_cancer": "classification", "diabetes": "regression"}


@dataclasses.dataclass
class Table:
    name: str
    columns: list[str]
    values: np.ndarray  # (rows, cols) float32, standardized
    target: np.ndarray | None = None
    task: str | None = None


def _hash_vector(token: str, dim: int) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(token.encode())).normal(size=dim)


def name_embedding(name: str, dim: int) -> np.ndarray:
    """A unit vector for a column name: the mean of hashed vectors of its words and of the
    character trigrams of ``<word>`` (lower-cased, split on non-alphanumerics)."""
    words = [w for w in re.split(r"[^0-9a-z]+", name.lower()) if w] or [name.lower()]
    tokens = [f"w:{w}" for w in words]
    for w in words:
        padded = f"<{w}>"
        tokens += [padded[i:i + 3] for i in range(len(padded) - 2)]
    v = np.mean([_hash_vector(t, dim) for t in tokens], axis=0)
    return (v / np.linalg.norm(v)).astype(np.float32)


def standardize(x: np.ndarray) -> np.ndarray:
    """Per column: ``(x - median) / (IQR / 1.349)`` (the std when Gaussian), clipped to
    [-5, 5]; a column with zero IQR is scaled by its std instead (or left at 0)."""
    x = np.asarray(x, np.float64)
    q1, med, q3 = np.percentile(x, [25, 50, 75], axis=0)
    scale = (q3 - q1) / 1.349
    scale = np.where(scale > 0, scale, x.std(0))
    return np.clip((x - med) / np.where(scale > 0, scale, 1.0), -5, 5).astype(np.float32)


def pretraining_tables(max_rows: int, seed: int, names=PRETRAIN) -> list[Table]:
    """statsmodels' tables (numeric columns, complete rows, at most ``max_rows`` rows)."""
    import statsmodels.api as sm

    rng, out = np.random.default_rng(seed), []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = getattr(sm.datasets, name).load_pandas().data
        frame = frame.select_dtypes("number").dropna()
        if len(frame) > max_rows:
            frame = frame.iloc[np.sort(rng.choice(len(frame), max_rows, replace=False))]
        out.append(Table(name, [str(c) for c in frame.columns], standardize(frame.to_numpy())))
    return out


def downstream_tables(names=tuple(DOWNSTREAM)) -> list[Table]:
    """scikit-learn's tables with their targets and task."""
    from sklearn import datasets

    out = []
    for name in names:
        if name not in DOWNSTREAM:
            raise ValueError(f"unknown downstream table {name!r}; known: {tuple(DOWNSTREAM)}")
        bunch = getattr(datasets, f"load_{name}")()
        out.append(Table(name, list(bunch.feature_names), standardize(bunch.data),
                         np.asarray(bunch.target), DOWNSTREAM[name]))
    return out


def padded(table: Table, n_cols: int, d_name: int):
    """``(names (cols, d_name), values (rows, cols), mask (cols,))`` padded to ``n_cols``."""
    c = len(table.columns)
    if c > n_cols:
        raise ValueError(f"table {table.name!r} has {c} columns, more than n_cols={n_cols}; "
                         f"raise model n_cols")
    names = np.zeros((n_cols, d_name), np.float32)
    names[:c] = np.stack([name_embedding(col, d_name) for col in table.columns])
    values = np.zeros((len(table.values), n_cols), np.float32)
    values[:, :c] = table.values
    return names, values, np.arange(n_cols) < c
