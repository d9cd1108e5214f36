"""Read GGUF files: the header, the metadata, the tensor table, and dequantization.

``_read(path)`` parses a GGUF file (versions 2 and 3, little-endian) with a small reader of
our own over a numpy memory map (faster than ``gguf.GGUFReader``; see ``_read``); tensor
data stays mapped until ``_dequantize`` turns it into float32 with ``gguf.quants.dequantize``
(F64 stays float64): exactly the values llama.cpp defines for each type.
``supported_types()`` lists the readable types: F64 and every type ``gguf.quants``
implements (F32, F16, BF16, Q4_0..Q8_0, the K-quants, the IQ types, ...). A truncated or
corrupt file raises ``ValueError`` naming the file. Needs the ``gguf`` package (the
``real`` extra); :mod:`mechinterp.models.gguf` builds models from what it reads.
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


def _gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError("reading GGUF files needs the gguf package: pip install "
                          "'gguf>=0.10' (or the extra: pip install 'mechinterp[real]')"
                          ) from error
    return gguf


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "gguf " + version("gguf")
    except PackageNotFoundError:
        return "gguf, version unknown"


class _Tensor(NamedTuple):
    """One tensor of a GGUF file: its name, numpy-order shape (the GGUF dims reversed:
    rows first), type and raw bytes (a view into the memory-mapped file)."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


# GGUF metadata value types: struct format (or the marks for string and array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads from the mapped file; reading past its end is a
    truncated file."""

    def __init__(self, path: Path, buf: np.ndarray):
        self.path, self.buf, self.pos = path, buf, 0
        self.view = memoryview(buf)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): "
                             f"it ends at byte {len(self.buf)}, the header needs "
                             f"{self.pos + n}")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return str(raw, "utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:  # numeric arrays in one go
                dtype = np.dtype(_SCALARS[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): "
                         f"unknown metadata value type {kind} at byte {self.pos}")


def _read(path: Path) -> tuple[dict[str, Any], list[_Tensor]]:
    """``(metadata, tensors)`` of a GGUF file (versions 2 and 3, little-endian).

    A small reader of our own rather than ``gguf.GGUFReader``, which builds numpy views of
    every metadata item: 2.3 s of CPU for SmolLM2's 49k-token vocabulary, against 0.2 s
    here. Tensor data stays memory-mapped until dequantized.
    """
    gguf = _gguf()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(
        0, np.uint8)
    cur = _Cursor(path, buf)
    if bytes(cur.take(4)) != b"GGUF":
        raise ValueError(f"{path} is not a readable GGUF file: it does not start with the "
                         "GGUF magic bytes")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (versions 2 and 3, "
                         "little-endian; a huge number means a big-endian file)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(
                f"{path}: tensor {name} has unknown quantization type id {type_id}; it may be "
                f"a type newer than this gguf package ({_version()}): upgrade gguf, or the "
                "file is corrupt") from None
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment={alignment!r} is not a power of two; the "
                         "file is corrupt")
    start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = math.prod(shape)
        if n % block:
            raise ValueError(f"{path}: tensor {name} has {n} elements, not a multiple of the "
                             f"{qtype.name} block size {block}; the file is corrupt")
        begin, end = start + offset, start + offset + n // block * type_size
        if end > len(buf):
            raise ValueError(f"{path}: tensor {name} ends at byte {end} but the file has "
                             f"{len(buf)}; the file is truncated or corrupt")
        tensors.append(_Tensor(name, shape, qtype, buf[begin:end]))
    return meta, tensors


def _dequantize(path: Path, tensor: _Tensor) -> np.ndarray:
    """One tensor as a float32 (F64: float64) numpy array of its numpy-order shape."""
    gguf = _gguf()
    from gguf import quants

    if tensor.qtype == gguf.GGMLQuantizationType.F64:
        values = tensor.data.view(np.float64)
    else:
        try:
            values = quants.dequantize(np.asarray(tensor.data), tensor.qtype)
        except NotImplementedError:
            raise ValueError(
                f"{path}: tensor {tensor.name} has quantization type {tensor.qtype.name}, "
                f"which load_gguf cannot dequantize; supported: {supported_types()}") from None
    return np.asarray(values).reshape(tensor.shape)


@functools.cache
def supported_types() -> tuple[str, ...]:
    """The GGUF tensor types :func:`load_gguf` reads: F64 and those ``gguf.quants``
    dequantizes in numpy (found by dequantizing one zero block of each)."""
    gguf = _gguf()
    from gguf import quants

    names = {"F64"}
    for qtype in gguf.GGMLQuantizationType:
        block, type_size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not type_size:
            continue
        try:
            out = quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except Exception:  # NotImplementedError, or a type gguf knows only by name
            continue
        if np.issubdtype(np.asarray(out).dtype, np.floating):
            names.add(qtype.name)
    return tuple(sorted(names))


def _check_tensor_types(path: Path, tensors: list[_Tensor]) -> None:
    """Refuse a file holding a tensor type we cannot read, before dequantizing anything."""
    names = supported_types()
    for tensor in tensors:
        if tensor.qtype.name not in names:
            raise ValueError(
                f"{path}: tensor {tensor.name} has quantization type {tensor.qtype.name}, "
                f"which load_gguf cannot dequantize; supported: {list(names)}")
