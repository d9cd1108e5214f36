"""Training objectives: what a model is fed from a batch and how its output is scored.

An :class:`Objective` returns *sums* (loss, weight, correct predictions, ...) rather than
means, so gradient accumulation and data parallelism divide once by the batch's total
weight and give exactly the full-batch mean. All scoring runs in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]


def _field(batch: Batch, key: str, objective: str) -> jax.Array:
    if key not in batch:
        raise KeyError(
            f"the {objective!r} objective needs batch[{key!r}], but the batch has "
            f"{sorted(batch)}"
        )
    return batch[key]


@dataclasses.dataclass(frozen=True)
class Objective:
    """``inputs(batch)`` -> positional model inputs; ``weight(batch)`` -> the number of
    scored targets (from the data alone); ``terms(outputs, batch)`` -> dict of float32
    sums with at least ``loss`` and ``weight``."""

    name: str
    inputs: Callable[[Batch], tuple]
    weight: Callable[[Batch], jax.Array]
    terms: Callable[[jax.Array, Batch], dict[str, jax.Array]]


def _target_mask(batch: Batch) -> jax.Array:
    tokens = _field(batch, "tokens", "next_token")
    mask = batch.get("loss_mask")
    mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return mask[:, 1:]


def next_token_terms(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Cross entropy of ``logits[:, t]`` against ``tokens[:, t + 1]``.

    ``batch['loss_mask']`` (optional, same shape as ``tokens``) marks which tokens are
    targets (position ``t + 1`` is scored iff ``loss_mask[:, t + 1]``). Also counts correct
    argmax predictions and whole sequences whose targets are all correct (``exact``).
    """
    tokens = _field(batch, "tokens", "next_token")
    mask = _target_mask(batch)
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    scored_rows = (mask.sum(-1) > 0).astype(jnp.float32)
    row_correct = jnp.all((correct > 0) | (mask == 0), axis=-1).astype(jnp.float32)
    return {
        "loss": jnp.sum(losses * mask),
        "weight": jnp.sum(mask),
        "correct": jnp.sum(correct * mask),
        "exact": jnp.sum(row_correct * scored_rows),
        "sequences": jnp.sum(scored_rows),
    }


def classification_terms(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Cross entropy of ``logits`` (batch, classes) against ``batch['label']`` (batch,),
    weighted by the optional ``batch['weight']`` (batch,)."""
    labels = _field(batch, "label", "classification")
    weight = _class_weight(batch)
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
        "loss": jnp.sum(losses * weight),
        "weight": jnp.sum(weight),
        "correct": jnp.sum(correct * weight),
    }


def _class_weight(batch: Batch) -> jax.Array:
    labels = _field(batch, "label", "classification")
    weight = batch.get("weight")
    return jnp.ones(labels.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)


OBJECTIVES: dict[str, Objective] = {
    "next_token": Objective(
        name="next_token",
        inputs=lambda batch: (_field(batch, "tokens", "next_token"),),
        weight=lambda batch: jnp.sum(_target_mask(batch)),
        terms=next_token_terms,
    ),
    "classification": Objective(
        name="classification",
        inputs=lambda batch: (_field(batch, "inputs", "classification"),),
        weight=lambda batch: jnp.sum(_class_weight(batch)),
        terms=classification_terms,
    ),
}


def get_objective(objective: str | Objective) -> Objective:
    """An :class:`Objective` by name (``'next_token'``, ``'classification'``) or as given."""
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective]
