"""Flow-matching training for :func:`mechinterp.train.fit`: a data source and an objective.

:class:`FlowSource` repeats a labelled image set (images in [-1, 1]) and gives every
example a ``noise_seed`` (its index), so each of the ``repeats`` passes sees fresh noise
and times while the run stays reproducible. :func:`flow_objective` draws ``eps`` and
``t ~ U(0, 1)`` from that seed inside the step and scores
:func:`mechinterp.models.diffusion.flow_pair`'s velocity target: ``loss`` is the sum over
examples of the per-pixel mean squared error, ``weight`` the number of examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.models.diffusion import flow_pair
from mechinterp.train.losses import Objective


class FlowSource:
    """Random-access source: example ``i`` is image ``i % n`` with ``noise_seed = i``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, repeats: int):
        if len(images) != len(labels) or repeats < 1:
            raise ValueError(f"need as many labels ({len(labels)}) as images ({len(images)}) "
                             f"and repeats >= 1 (got {repeats})")
        self.images = np.asarray(images, np.float32)
        self.labels = np.asarray(labels, np.int32)
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, i: int) -> dict:
        j = int(i) % len(self.images)
        return {"image": self.images[j], "label": self.labels[j],
                "noise_seed": np.uint32(i)}


def noise_and_time(batch) -> tuple[jax.Array, jax.Array]:
    """``(eps, t)`` from ``batch['noise_seed']``: the same seed, the same draw."""
    shape = batch["image"].shape[1:]

    def draw(seed):
        k_eps, k_t = jax.random.split(jax.random.key(seed))
        return jax.random.normal(k_eps, shape), jax.random.uniform(k_t)

    return jax.vmap(draw)(jnp.asarray(batch["noise_seed"], jnp.uint32))


def dropped_labels(batch, label_dropout: float, null_label: int) -> jax.Array:
    """``batch['label']`` with each replaced by ``null_label`` with probability
    ``label_dropout``, the draw fixed by ``batch['noise_seed']``."""
    seeds = jnp.asarray(batch["noise_seed"], jnp.uint32)
    u = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(jax.random.key(s), 2)))(seeds)
    return jnp.where(u < label_dropout, null_label, jnp.asarray(batch["label"], jnp.int32))


def _terms(outputs, batch):
    eps, t = noise_and_time(batch)
    _, target = flow_pair(jnp.asarray(batch["image"], jnp.float32), eps, t)
    err = jnp.square(outputs.astype(jnp.float32) - target)
    per_example = err.reshape(err.shape[0], -1).mean(-1)
    return {"loss": per_example.sum(), "weight": jnp.float32(per_example.shape[0])}


def flow_objective(label_dropout: float = 0.0, null_label: int | None = None) -> Objective:
    """The rectified-flow objective; the model is called ``model(x_t, t, label)``, the
    label dropped to ``null_label`` with probability ``label_dropout`` (module docstring)."""
    if not 0 <= label_dropout < 1 or (label_dropout > 0 and null_label is None):
        raise ValueError(f"label_dropout must be in [0, 1) and, when > 0, come with a "
                         f"null_label (the model's null class id, e.g. n_classes); got "
                         f"label_dropout={label_dropout}, null_label={null_label}")

    def inputs(batch):
        eps, t = noise_and_time(batch)
        x_t, _ = flow_pair(jnp.asarray(batch["image"], jnp.float32), eps, t)
        labels = (dropped_labels(batch, label_dropout, null_label) if label_dropout
                  else batch["label"])
        return x_t, t, labels

    return Objective(name="flow_matching", inputs=inputs,
                     weight=lambda batch: jnp.float32(batch["label"].shape[0]), terms=_terms)
