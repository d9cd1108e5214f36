"""What the depth / redundancy / bricks experiments share: presets, a synthetic task mixture,
small decoders trained (or reused) with :func:`mechinterp.experiments.recall_reasoning.train_family`,
and teacher-forced evaluation per task with :func:`mechinterp.train.losses.next_token_terms`.

An experiment config has ``seed``, ``preset``, ``progress``, ``data`` (``tasks``: the
:func:`~mechinterp.train.tasks.mixture_from_config` dict; ``knowledge``, ``seq_len``,
``num_train``, ``num_test``), ``model`` (``d_model``, ``n_layers``, ``n_heads``, ``d_mlp``)
and ``train`` (``steps``, ``batch_size``, ``learning_rate``, ``warmup_steps``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mechinterp.experiments.recall_reasoning import logits_of, train_family
from mechinterp.train.data import build_synthetic
from mechinterp.train.losses import next_token_terms
from mechinterp.train.tasks import TaskMixture, mixture_from_config


def resolve_preset(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                   presets: dict[str, dict]) -> ml_collections.ConfigDict:
    """``config`` with ``presets[config.preset]`` applied; a key set away from its default
    wins over the preset (``preset=smoke train.steps=40`` trains 40 steps)."""
    if config.preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {config.preset!r}")
    resolved = ml_collections.ConfigDict(config.to_dict())
    for key, value in presets[config.preset].items():
        *parents, leaf = key.split(".")
        node, default, target = config, defaults, resolved
        for part in parents:
            node, default, target = node[part], default[part], target[part]
        if node[leaf] == default[leaf]:
            target[leaf] = value
    return resolved


def make_mixture(config) -> TaskMixture:
    d = config.data
    return mixture_from_config(d.tasks.to_dict(), knowledge=d.knowledge.to_dict(),
                               seq_len=d.seq_len, seed=config.seed)


def make_data(config, workdir: Path):
    """``(mixture, tfds builder)`` of the config's task mixture under ``workdir/data``."""
    mixture = make_mixture(config)
    builder = build_synthetic(mixture, num_train=config.data.num_train,
                              num_test=config.data.num_test, data_dir=workdir / "data")
    return mixture, builder


def train_model(config, builder, vocab_size: int, folder: Path, **model):
    """Train (or reuse) a LLaMA-style decoder under ``folder``; ``model`` overrides
    ``config.model`` fields. Returns ``(model, params, info)``."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(model)
    return train_family(config, "llama", builder, vocab_size, folder)


@dataclasses.dataclass
class Examples:
    """Test examples: ``tokens``, ``loss_mask`` (targets), ``task`` (index into
    ``task_names``) and ``real`` (non-padding positions)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    task: np.ndarray
    real: np.ndarray
    task_names: tuple[str, ...]

    def of_task(self, index: int) -> Examples:
        rows = self.task == index
        return Examples(self.tokens[rows], self.loss_mask[rows], self.task[rows],
                        self.real[rows], self.task_names)


def examples(mixture: TaskMixture, split: str, n: int) -> Examples:
    rows = list(mixture.examples(split, n))
    tokens = np.stack([r["tokens"] for r in rows])
    return Examples(tokens=tokens, loss_mask=np.stack([r["loss_mask"] for r in rows]),
                    task=np.asarray([r["task"] for r in rows]),
                    real=tokens != mixture.tokenizer().pad_id,
                    task_names=tuple(t.name for t, _ in mixture.tasks))


def metrics_from_logits(logits, data: Examples) -> dict:
    """Target loss, token accuracy and exact match (all targets right), overall and per
    task, from teacher-forced logits."""
    out = {}
    groups = [("all", np.ones(len(data.task), bool))] + [
        (name, data.task == i) for i, name in enumerate(data.task_names)]
    for name, rows in groups:
        if not rows.any():
            continue
        t = jax.device_get(next_token_terms(jnp.asarray(logits)[rows], {
            "tokens": jnp.asarray(data.tokens[rows]),
            "loss_mask": jnp.asarray(data.loss_mask[rows])}))
        out[name] = {"loss": float(t["loss"] / t["weight"]),
                     "token_acc": float(t["correct"] / t["weight"]),
                     "exact": float(t["exact"] / t["sequences"])}
    return out


def lm_metrics(model, params, data: Examples) -> dict:
    return metrics_from_logits(logits_of(model, params, data.tokens), data)


@functools.cache
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive backend."""
    return _plt().subplots(*args, **kwargs)


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


def training_note(info: dict) -> str:
    """How the model of a run came about, for report headers."""
    if info["reused_checkpoint"]:
        return "model reused from an earlier run's checkpoint"
    return f"training took {info['seconds']:.0f} s"


def json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def base_config() -> ml_collections.ConfigDict:
    """Shared defaults (each experiment changes what it needs)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.preset = "default"
    c.progress = True
    c.data = ml_collections.ConfigDict()
    c.data.tasks = {"recall": {}, "chain": {"n_symbols": 12, "length": 3, "weight": 2.0}}
    c.data.knowledge = {"n_entities": 24, "n_relations": 3}
    c.data.seq_len = 20
    c.data.num_train = 8192
    c.data.num_test = 512
    c.model = ml_collections.ConfigDict()
    c.model.d_model = 64
    c.model.n_layers = 6
    c.model.n_heads = 4
    c.model.d_mlp = 128
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 32
    c.train.learning_rate = 1e-2
    c.train.warmup_steps = 50
    return c


SMOKE = {"data.knowledge.n_entities": 8, "data.knowledge.n_relations": 2, "data.num_train": 256,
         "data.num_test": 64, "model.d_model": 16, "model.n_heads": 2, "model.d_mlp": 16,
         "train.steps": 8, "train.warmup_steps": 2}
