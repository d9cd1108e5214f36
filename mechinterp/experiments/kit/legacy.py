"""Compatibility for experiments not yet ported to the kit (llm_drop, depth_efficiency,
bricks, probe_prompting): the names they imported from ``small_lm`` and
``recall_reasoning``. Delete this module once they are ported (docs/adding_a_reproduction.md
says what changes).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from mechinterp.cli import get_path as _get
from mechinterp.cli import set_path as _set
from mechinterp.experiments.kit.jsonio import Encoder
from mechinterp.experiments.kit.lm import (Examples, examples, lm_metrics, logits_of,
                                           make_data, make_mixture, metrics_from_logits,
                                           train_decoder)
from mechinterp.experiments.kit.plots import pyplot
from mechinterp.experiments.kit.train import training_note

__all__ = ["Examples", "examples", "lm_metrics", "logits_of", "make_data", "make_mixture",
           "metrics_from_logits", "training_note", "resolve_preset", "train_model",
           "train_family", "figure", "save", "json_default", "base_config", "SMOKE",
           "_get", "_set"]


def resolve_preset(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                   presets: dict[str, dict]) -> ml_collections.ConfigDict:
    """``config`` with ``presets[config.preset]`` applied; a key set away from its default
    wins over the preset (``preset=smoke train.steps=40`` trains 40 steps)."""
    if config.preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {config.preset!r}")
    resolved = ml_collections.ConfigDict(config.to_dict())
    for key, value in presets[config.preset].items():
        if _get(config, key) == _get(defaults, key):
            _set(resolved, key, value)
    return resolved


def train_family(config, family: str, builder, vocab_size: int, workdir: Path):
    """``(model, params, info)`` of ``family`` trained (or reused) in
    ``workdir/models/family``."""
    trained = train_decoder(config, family, builder, vocab_size,
                            Path(workdir) / "models" / family)
    return trained.model, trained.params, trained.info


def train_model(config, builder, vocab_size: int, folder: Path, **model):
    """Train (or reuse) a LLaMA-style decoder under ``folder / "models" / "llama"``;
    ``model`` overrides ``config.model`` fields. Returns ``(model, params, info)``."""
    trained = train_decoder(config, "llama", builder, vocab_size,
                            Path(folder) / "models" / "llama", model=model)
    return trained.model, trained.params, trained.info


def figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive backend."""
    return pyplot().subplots(*args, **kwargs)


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path.name


def json_default(x):
    try:
        return Encoder().default(x)
    except TypeError:
        return str(x)


def base_config() -> ml_collections.ConfigDict:
    """Shared defaults (each experiment changes what it needs)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.preset = "default"
    c.progress = True
    c.retrain = False
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
