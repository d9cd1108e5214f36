"""Fingerprints of training runs: which model, data and settings a checkpoint came from.

A checkpoint folder holds ``fingerprint.json`` next to ``checkpoints/``::

    {"hash": "<sha256 of settings>", "settings": {"model.d_model": 64, "train.steps": 1200, ...}}

written *before* training starts, so an interrupted run's partial checkpoints are guarded
too. :func:`guard` compares a new run's fingerprint with the folder's and refuses to resume
or reuse a checkpoint trained with other settings, naming the keys that differ; with
``retrain=True`` the old run's files (:data:`TRAINING_FILES`) are moved aside
(``<folder>/replaced-<n>/``, never deleted) and training starts afresh.

Used by :func:`mechinterp.train.loop.run` (the generic ``mechinterp run`` training job)
and by the experiment kit's ``train_or_reuse``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechinterp import atomic

FILE = "fingerprint.json"
# What a training run writes into its folder (moved aside together on retrain; anything
# else there, e.g. a data/ folder, stays).
TRAINING_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", FILE)

# Training settings that do not change the trained parameters (logging, checkpoint
# cadence, progress bars, where files go, the mesh: checkpoints restore onto any mesh).
IGNORED_TRAIN_KEYS = (
    "job", "workdir", "distributed", "mesh", "rules", "data.dir", "train.log_every",
    "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoints", "train.peak_flops",
    "train.progress", "train.tensorboard", "data.eval_batch_size", "retrain", "overwrite",
)


class FingerprintMismatch(ValueError):
    """A folder holds a checkpoint trained with other settings than the ones asked for."""


def describe(obj: Any) -> Any:
    """A JSON-able, deterministic description of ``obj``: dataclasses (including linen
    modules, minus ``parent``/``name``) become dicts tagged with their class, mappings
    dicts, sequences lists, numpy values Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"__class__": f"{type(obj).__module__}.{type(obj).__qualname__}"}
        for field in dataclasses.fields(obj):
            if field.name in ("parent", "name") or not field.init:
                continue
            out[field.name] = describe(getattr(obj, field.name))
        return out
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        return describe(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (str, bytes)):
        return obj if isinstance(obj, str) else obj.hex()
    if isinstance(obj, Sequence):
        return [describe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.dtype) or isinstance(obj, type):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return repr(obj)


def describe_source(source, n: int = 64) -> dict:
    """Length and content hash of the first ``n`` and last example of a random-access data
    source (cheap: a tfds split is not read in full)."""
    length = len(source)
    digest = hashlib.sha256()
    for i in sorted(set(range(min(n, length))) | ({length - 1} if length else set())):
        example = source[i]
        for key in sorted(example):
            value = np.asarray(example[key])
            digest.update(f"{i}/{key}/{value.dtype}/{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return {"len": length, "sample_sha256": digest.hexdigest()[:16]}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for nested dicts (lists stay leaves)."""
    if isinstance(tree, Mapping) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def without(flat: Mapping[str, Any], ignore: Sequence[str]) -> dict[str, Any]:
    """``flat`` (from :func:`flatten`) minus every key in ``ignore`` and every key under
    one (``"a"`` drops ``"a"`` and ``"a.b"``)."""
    return {k: v for k, v in flat.items()
            if not any(k == i or k.startswith(i + ".") for i in ignore)}


def fingerprint(*, model: Any, data: Any, train: Any,
                ignore: Sequence[str] = IGNORED_TRAIN_KEYS) -> dict:
    """``{"hash", "settings"}`` of a training run: the model (a linen module or its
    description), the data (a description, e.g. :func:`describe_source` plus the settings
    that generated it) and the training config minus ``ignore`` d keys."""
    train = without(flatten(describe(train)), ignore)
    settings = {**flatten(describe(model), "model."), **flatten(describe(data), "data."),
                **{f"train.{k}": v for k, v in train.items()}}
    settings = json.loads(json.dumps(settings, sort_keys=True))  # tuples -> lists, etc.
    blob = json.dumps(settings, sort_keys=True).encode()
    return {"hash": hashlib.sha256(blob).hexdigest(), "settings": settings}


def differences(old: Mapping, new: Mapping) -> list[str]:
    """``key: old -> new`` for every setting that differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            lines.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines


def _has_checkpoint(folder: Path) -> bool:
    ckpt = folder / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def numbered_folder(parent: Path, prefix: str = "") -> Path:
    """Create and return ``parent/<prefix><n>`` for the smallest ``n`` not yet there
    (where a replaced run's files move aside)."""
    n = 0
    while (parent / f"{prefix}{n}").exists():
        n += 1
    folder = parent / f"{prefix}{n}"
    folder.mkdir(parents=True)
    return folder


def guard(folder: str | Path, print_: dict, *, retrain: bool = False) -> str:
    """Check ``folder``'s checkpoint against ``print_`` (from :func:`fingerprint`) and write
    the fingerprint; returns "new", "same" (resume / reuse) or "retrained".

    A folder with checkpoints but another fingerprint (or none) raises
    :class:`FingerprintMismatch` naming the differing keys, unless ``retrain``: then its
    training files move to ``folder/replaced-<n>/`` and training starts afresh. Another
    fingerprint with no checkpoint (a run that failed first) is moved aside the same way.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    old = json.loads(path.read_text()) if path.exists() else None
    status = "new"
    if old is not None and old["hash"] == print_["hash"]:
        status = "same"
    elif old is not None or _has_checkpoint(folder):
        # Another fingerprint without a checkpoint (a run that failed before its first
        # checkpoint) guards no finished work: its files move aside without retrain=True.
        if _has_checkpoint(folder) and not retrain:
            diff = (differences(old["settings"], print_["settings"]) if old is not None
                    else ["(the checkpoint has no fingerprint.json: its settings are unknown)"])
            shown = "; ".join(diff[:12]) + (f" (and {len(diff) - 12} more)" if len(diff) > 12
                                           else "")
            raise FingerprintMismatch(
                f"{folder} holds a checkpoint trained with other settings: {shown}. Pass "
                "retrain=True (on the command line: retrain=True) to train anew (the old "
                f"files move to {folder}/replaced-<n>/), or use another workdir.")
        aside = numbered_folder(folder, "replaced-")
        for name in TRAINING_FILES:
            if (folder / name).exists():
                (folder / name).rename(aside / name)
        status = "retrained"
    atomic.write_json(path, print_, indent=1, sort_keys=True)
    return status
