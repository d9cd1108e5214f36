"""Atomic writes of run metadata (config.json, run.json, results.json, fingerprint.json).

The text goes to a temporary file in the same folder, is flushed to disk, and is renamed
over the target with ``os.replace``: a reader (or a run killed mid-write) sees the old file
or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def writing(path: str | os.PathLike, mode: str = "w"):
    """``with writing(path) as f: ...``: ``f`` is a temporary file in ``path``'s folder,
    flushed to disk and renamed over ``path`` when the block ends without error (removed
    otherwise, leaving the old ``path`` whole)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`writing`)."""
    with writing(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> Path:
    """``json.dumps(obj, indent=2, **dumps_kwargs)`` written atomically (see
    :func:`write_text`)."""
    dumps_kwargs.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")

