"""One JSON encoder for results: numpy / jax scalars and arrays, dataclasses, paths,
ConfigDicts, sets and tuples."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePath

import numpy as np

from mechinterp import atomic


class Encoder(json.JSONEncoder):
    """``json.dumps(obj, cls=Encoder)``: arrays become (nested) lists, numpy/jax scalars
    Python numbers, dataclasses dicts, paths strings. Anything else is an error (a result
    that silently became ``str(obj)`` is a bug found later)."""

    def default(self, obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if hasattr(obj, "__jax_array__") or type(obj).__module__.startswith("jax"):
            return np.asarray(obj).tolist()
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        if isinstance(obj, PurePath):
            return str(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        if hasattr(obj, "to_dict") and callable(obj.to_dict):
            return obj.to_dict()
        return super().default(obj)


def dumps(obj, **kwargs) -> str:
    return json.dumps(obj, cls=Encoder, indent=kwargs.pop("indent", 2), **kwargs)


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` with :class:`Encoder` atomically (:func:`mechinterp.atomic.write_json`:
    a temporary file in the same folder, then ``os.replace``)."""
    return atomic.write_json(path, obj, cls=Encoder)
