"""Checks of inputs at the public boundary, shared by every family.

JAX gathers do not check bounds and broadcasting hides shape mistakes, so the public entry
points (capture, intervene, sweeps, ablation, metrics, generation, training batches) check
their *concrete* inputs here before running anything; traced calls are a documented
contract. Errors are ``ValueError`` (value, shape) or ``TypeError`` (kind, dtype) naming
the argument and the culprit. ``checks_disabled()`` turns the checks off (benchmarks
only). What is checked where, and its cost: docs/errors.md.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mechinterp.family import TokenInputs, has

class NonFiniteError(FloatingPointError, ValueError):
    """An array that must be finite holds NaN or inf (also a ``ValueError``)."""


IGNORE_LABEL = -100  # the usual "ignore" label of cross-entropy losses (PyTorch, HF)
_ENABLED = [True]


@contextlib.contextmanager
def checks_disabled():
    """Skip the checks of this module inside the context (for measuring their cost)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def enabled() -> bool:
    return _ENABLED[-1]


def is_concrete(x) -> bool:
    """Whether ``x`` holds values we can read (not a tracer inside ``jit``/``vmap``)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def check_positive_int(value, name: str, *, allow_none: bool = False) -> None:
    """``value`` is an int >= 1 (e.g. ``chunk_size``, ``checkpoint_every``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_index(value, name: str) -> int:
    """``value`` is an integer index (a layer, a head): not a float, bool or string."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(
                value.dtype, np.integer):
            return int(value)
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _out_of_range(values: np.ndarray, low: int, high: int) -> tuple | None:
    """The first index where ``values`` is outside ``[low, high)``, or ``None``."""
    bad = (values < low) | (values >= high)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def check_token_ids(tokens, vocab_size: int | None, name: str = "tokens", *,
                    batched: bool = True, allow: tuple[int, ...] = ()) -> None:
    """``tokens`` is an integer ``(batch, pos)`` array (``batched``), not empty, with every
    id in ``[0, vocab_size)`` (``vocab_size=None``: only ``>= 0``); ids in ``allow`` (e.g.
    an ignore label of a loss) pass. Skipped for traced values."""
    if not enabled() or not is_concrete(tokens) or tokens is None:
        return
    if isinstance(tokens, (list, tuple)):
        raise TypeError(
            f"{name} is a Python {type(tokens).__name__}; pass an integer array of shape "
            "(batch, pos), e.g. jnp.asarray([[...]]) (a list of ids is one row: wrap it)")
    if not hasattr(tokens, "dtype") or not hasattr(tokens, "shape"):
        raise TypeError(f"{name} must be an integer array (batch, pos), got "
                        f"{type(tokens).__name__}")
    dtype = np.dtype(tokens.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {dtype}: token ids "
                        "are indices, cast with .astype(jnp.int32) if the values are whole")
    shape = tuple(tokens.shape)
    if batched and len(shape) != 2:
        hint = " (one sequence: add a batch axis, tokens[None])" if len(shape) == 1 else ""
        raise ValueError(f"{name} must be (batch, pos), got shape {shape}{hint}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape}): an empty batch or sequence has "
                         "no activations or metric; pass at least one token per row")
    values = np.asarray(tokens)
    allowed = np.isin(values, allow) if allow else None
    low, high = int(values.min()), int(values.max())
    if low >= 0 and (vocab_size is None or high < vocab_size):
        return
    checked = values if allowed is None else np.where(allowed, 0, values)
    where = _out_of_range(checked, 0, vocab_size if vocab_size is not None else np.inf)
    if where is None:
        return
    value = int(values[where])
    place = (f"batch row {where[0]}, position {where[1]}" if len(where) == 2
             else f"index {where}")
    vocab = f"vocabulary size {vocab_size}" if vocab_size is not None else "ids must be >= 0"
    hint = ""
    if value == IGNORE_LABEL:
        hint = (f"; {IGNORE_LABEL} is the usual ignore label of a loss, not a token: "
                "mask those positions (attention_mask) or replace them with a real id")
    elif value < 0:
        hint = "; a negative id would silently read the vocabulary from the end"
    else:
        hint = "; an id past the vocabulary gives NaN logits"
    raise ValueError(f"{name}[{', '.join(map(str, where))}] = {value} at {place} is outside "
                     f"[0, {vocab_size if vocab_size is not None else 'inf'}) ({vocab}){hint}")


def check_mask(mask, tokens_shape: tuple[int, ...], name: str = "attention_mask") -> None:
    """An attention mask has the tokens' shape (no accidental broadcasting)."""
    if not enabled() or mask is None or not hasattr(mask, "shape"):
        return
    if tuple(mask.shape) != tuple(tokens_shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the tokens are "
                         f"{tuple(tokens_shape)}: the mask needs one entry per token")


def token_inputs(model, inputs: tuple, kwargs: Mapping[str, Any]):
    """``(tokens, attention_mask)`` of a call, when the family reads token ids
    (:class:`~mechinterp.family.TokenInputs`), else ``(None, None)``."""
    if not has(model, TokenInputs):
        return None, None
    return model.token_inputs(*inputs, **kwargs)


def check_model_inputs(model, inputs: tuple, kwargs: Mapping[str, Any]) -> None:
    """The checks every public entry runs on a model call's concrete inputs: token ids in
    the model's vocabulary, a 2-D non-empty batch, an attention mask of the tokens' shape."""
    if not enabled():
        return
    tokens, mask = token_inputs(model, inputs, kwargs)
    if tokens is None or not is_concrete(tokens):
        return
    check_token_ids(tokens, model.vocab_size)
    check_mask(mask, tuple(tokens.shape))


def check_positions(pos, seq_len: int, name: str = "pos") -> None:
    """Metric positions in ``[-seq_len, seq_len)`` (negative counts from the end)."""
    if not enabled() or not is_concrete(pos):
        return
    values = np.asarray(pos)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must be an int or an int array, got {values.dtype} "
                        f"({pos!r})")
    if values.size == 0:
        raise ValueError(f"{name} is empty")
    where = _out_of_range(values.reshape(-1), -seq_len, seq_len)
    if where is not None:
        value = int(values.reshape(-1)[where[0]])
        row = f" (example {where[0]})" if values.ndim else ""
        raise ValueError(f"{name}={value}{row} is outside [-{seq_len}, {seq_len}) for "
                         f"sequences of {seq_len} tokens: it would read another position")


def check_answer_ids(ids, batch: int, vocab_size: int | None, name: str) -> None:
    """Answer ids: an int or a ``(batch,)`` int array, each in ``[0, vocab_size)``."""
    if not enabled() or ids is None or not is_concrete(ids):
        return
    values = np.asarray(ids)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {values.dtype}")
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be an int or one id per example, shape ({batch},); "
                         f"got shape {values.shape}")
    flat = values.reshape(-1)
    where = _out_of_range(flat, 0, vocab_size if vocab_size is not None else np.inf)
    if where is not None:
        value = int(flat[where[0]])
        hint = (f" ({IGNORE_LABEL} is the usual ignore label, not an answer)"
                if value == IGNORE_LABEL else "")
        raise ValueError(f"{name}[{where[0]}] = {value} is outside [0, {vocab_size}) "
                         f"(vocabulary size {vocab_size}){hint}")


def check_same_shape(reference: tuple, other: tuple, what: str, reference_name: str,
                     other_name: str) -> None:
    """Two shapes that must be equal (nothing broadcasts by accident)."""
    if not enabled():
        return
    a, b = tuple(reference), tuple(other)
    if a != b:
        raise ValueError(f"{what}: {other_name} has shape {b} but {reference_name} has "
                         f"shape {a}; they must match (broadcasting would hide the mistake)")


def check_finite(tree: Mapping[str, Any], what: str) -> None:
    """Every array in ``{name: array}`` is finite; else an error naming the first that is
    not, and how many of its entries are NaN / inf."""
    for name, value in tree.items():
        if value is None or not is_concrete(value):
            continue
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.inexact) and array.dtype.kind != "V":
            try:
                array = array.astype(np.float32)
            except (TypeError, ValueError):
                continue
        array = array.astype(np.float32, copy=False)  # bfloat16 etc.: numpy's own float
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            raise NonFiniteError(
                f"{what} {name!r} has non-finite values: {n_nan} NaN and "
                f"{int((~finite).sum()) - n_nan} inf of {array.size} (shape {array.shape})")


def check_workdir(workdir, name: str = "workdir"):
    """``workdir`` as a ``Path``; refuses ``None``, ``""`` and blank strings, which ``Path``
    would read as the current directory (a run there overwrites whatever ``config.json``
    it holds). Always on (not affected by :func:`checks_disabled`)."""
    from pathlib import Path

    if workdir is None or (isinstance(workdir, str) and not workdir.strip()):
        raise ValueError(
            f"{name}={workdir!r} is empty: name the run folder (e.g. {name}=runs/my_run); "
            "an empty workdir would write into the current directory")
    if not isinstance(workdir, (str, Path)) and not hasattr(workdir, "__fspath__"):
        raise TypeError(f"{name} must be a path (str or Path), got {type(workdir).__name__} "
                        f"{workdir!r}")
    return Path(workdir)
