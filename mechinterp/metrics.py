"""Metrics on logits that also say which logits they need.

Each metric is a callable ``metric(logits) -> scalar`` on full logits ``(batch, pos,
vocab)`` and exposes ``positions(batch, seq_len)`` (and, reading few vocabulary entries,
``columns(batch)``), so a sweep on a family with output selection unembeds only those
(``on_selected`` / ``on_columns``). ``pos``: an int (negative from the end) or ``(batch,)``.
Over non-finite logits a metric is NaN, never finite; inputs are checked as in
docs/errors.md. Details: docs/analyses.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mechinterp import validate

Array = Any


def _reduce(values: Array, reduce: str) -> Array:
    if reduce == "mean":
        return values.mean()
    if reduce == "sum":
        return values.sum()
    if reduce == "none":
        return values
    raise ValueError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Metric:
    """Base: a metric reading the logits at one position per example."""

    pos: Array = -1
    reduce: str = "mean"

    def positions(self, batch: int, seq_len: int) -> Array:
        """``(batch, 1)`` positions whose logits this metric reads."""
        validate.check_positions(self.pos, seq_len)
        pos = jnp.asarray(self.pos, jnp.int32)
        if pos.ndim not in (0, 1) or (pos.ndim == 1 and pos.shape[0] != batch):
            raise ValueError(f"pos must be an int or a ({batch},) array, got shape {pos.shape}")
        pos = jnp.where(pos < 0, pos + seq_len, pos)
        return jnp.broadcast_to(pos, (batch,))[:, None]

    def vocabulary_ids(self) -> dict[str, Array]:
        """``{field name: ids}`` of the vocabulary ids this metric reads (checked)."""
        return {}

    def check(self, batch: int, seq_len: int, vocab_size: int | None) -> None:
        """Raise for positions outside ``[-seq_len, seq_len)``, answer ids outside
        ``[0, vocab_size)`` or of the wrong length, and empty inputs (concrete values
        only; called by the sweeps before anything compiles)."""
        if batch == 0 or seq_len == 0:
            raise ValueError(f"{type(self).__name__} got empty logits (batch {batch}, "
                             f"{seq_len} positions): a metric over nothing is undefined")
        validate.check_positions(self.pos, seq_len)
        for name, ids in self.vocabulary_ids().items():
            validate.check_answer_ids(ids, batch, vocab_size, name)

    def __call__(self, logits: Array) -> Array:
        batch, seq_len = logits.shape[:2]
        self.check(batch, seq_len, logits.shape[-1])
        selected = jnp.take_along_axis(logits, self.positions(batch, seq_len)[..., None], axis=1)
        return self.on_selected(selected)

    def on_selected(self, logits: Array) -> Array:
        """The metric from logits ``(batch, 1, vocab)`` at :meth:`positions`."""
        values = self.per_example(logits[:, 0].astype(jnp.float32))
        return _reduce(values, self.reduce)

    def per_example(self, logits: Array) -> Array:
        raise NotImplementedError

    def columns(self, batch: int) -> Array | None:
        """``(batch, n)`` vocabulary ids whose logits this metric reads (then a model that
        accepts ``logit_columns=`` computes only those, and the sweep calls
        :meth:`on_columns`), or ``None`` when it needs the whole vocabulary."""
        return None

    def on_columns(self, logits: Array) -> Array:
        """The metric from logits ``(batch, 1, n)`` at :meth:`positions` and :meth:`columns`."""
        raise NotImplementedError


def _answer(logits: Array, ids: Array, name: str = "answer_ids") -> Array:
    validate.check_answer_ids(ids, logits.shape[0], logits.shape[-1], name)
    ids = jnp.broadcast_to(jnp.asarray(ids), logits.shape[:1])
    return jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]


def _nan_where_not_finite(values: Array, logits: Array) -> Array:
    """``values`` per example, NaN where that example's logits hold NaN or +inf (-inf is a
    legitimate "never" logit)."""
    bad = jnp.isnan(logits).any(-1) | (logits == jnp.inf).any(-1)
    return jnp.where(bad, jnp.nan, values)


@dataclasses.dataclass(frozen=True, eq=False)
class LogitDiff(Metric):
    """``logit[correct] - logit[incorrect]`` at ``pos``."""

    correct_ids: Array = None
    incorrect_ids: Array = None

    def vocabulary_ids(self):
        return {"correct_ids": self.correct_ids, "incorrect_ids": self.incorrect_ids}

    def per_example(self, logits):
        return (_answer(logits, self.correct_ids, "correct_ids")
                - _answer(logits, self.incorrect_ids, "incorrect_ids"))

    def columns(self, batch):
        ids = [jnp.broadcast_to(jnp.asarray(i, jnp.int32), (batch,))
               for i in (self.correct_ids, self.incorrect_ids)]
        return jnp.stack(ids, axis=-1)

    def on_columns(self, logits):
        logits = logits[:, 0].astype(jnp.float32)
        return _reduce(logits[:, 0] - logits[:, 1], self.reduce)


@dataclasses.dataclass(frozen=True, eq=False)
class LogProb(Metric):
    """``log softmax(logits)[answer]`` at ``pos``."""

    answer_ids: Array = None

    def vocabulary_ids(self):
        return {"answer_ids": self.answer_ids}

    def per_example(self, logits):
        values = _answer(jax.nn.log_softmax(logits, axis=-1), self.answer_ids)
        return _nan_where_not_finite(values, logits)


@dataclasses.dataclass(frozen=True, eq=False)
class Accuracy(Metric):
    """Whether ``argmax(logits) == answer`` at ``pos`` (a float, so it averages)."""

    answer_ids: Array = None

    def vocabulary_ids(self):
        return {"answer_ids": self.answer_ids}

    def per_example(self, logits):
        validate.check_answer_ids(self.answer_ids, logits.shape[0], logits.shape[-1],
                                  "answer_ids")
        answer = jnp.broadcast_to(jnp.asarray(self.answer_ids), logits.shape[:1])
        correct = (jnp.argmax(logits, axis=-1) == answer).astype(jnp.float32)
        return _nan_where_not_finite(correct, logits)


@dataclasses.dataclass(frozen=True, eq=False)
class KL(Metric):
    """``KL(reference || patched)`` of the next-token distributions at ``pos``.

    ``reference_logits``: ``(batch, vocab)``, the reference (e.g. clean) logits at ``pos``.
    """

    reference_logits: Array = None

    def per_example(self, logits):
        reference = jax.nn.log_softmax(jnp.asarray(self.reference_logits, jnp.float32), -1)
        patched = jax.nn.log_softmax(logits, axis=-1)
        values = (jnp.exp(reference) * (reference - patched)).sum(-1)
        return _nan_where_not_finite(values, logits)


# Metrics are pytrees (their arrays are leaves, ``reduce`` is static), so a sweep passes
# them to its compiled function as arguments: a new metric instance does not recompile.
for _cls in (Metric, LogitDiff, LogProb, Accuracy, KL):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls) if f.name != "reduce"],
        meta_fields=["reduce"])


def logit_diff(correct_ids, incorrect_ids, pos=-1, reduce="mean") -> LogitDiff:
    return LogitDiff(pos=pos, reduce=reduce, correct_ids=correct_ids, incorrect_ids=incorrect_ids)


def logprob(answer_ids, pos=-1, reduce="mean") -> LogProb:
    return LogProb(pos=pos, reduce=reduce, answer_ids=answer_ids)


def accuracy(answer_ids, pos=-1, reduce="mean") -> Accuracy:
    return Accuracy(pos=pos, reduce=reduce, answer_ids=answer_ids)


def kl(reference_logits, pos=-1, reduce="mean") -> KL:
    """``reference_logits``: full ``(batch, pos, vocab)`` logits of the reference run."""
    reference = Metric(pos=pos)
    batch, seq_len = reference_logits.shape[:2]
    at_pos = jnp.take_along_axis(
        reference_logits, reference.positions(batch, seq_len)[..., None], axis=1
    )[:, 0]
    return KL(pos=pos, reduce=reduce, reference_logits=at_pos)
