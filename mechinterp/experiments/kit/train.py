"""Train or reuse a small model of any family, guarded by a fingerprint of its settings.

:func:`train_or_reuse` trains any linen module with :func:`mechinterp.train.loop.fit` in a
folder, or finds the finished checkpoint there and reuses it (a partial one is resumed).
``fingerprint.json`` (:mod:`mechinterp.train.fingerprint`) records the model, the data and
the training settings; a checkpoint written with other settings is refused, naming the
keys that differ, unless ``retrain=True``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import ml_collections

from mechinterp.experiments.kit.run import Interrupted
from mechinterp.train import fingerprint as fp
from mechinterp.train.checkpoint import Checkpointer
from mechinterp.train.config import default_config as default_train_config
from mechinterp.train.config import resolve_config
from mechinterp.train.loop import fit


# fit() is given the model and the data, which are fingerprinted themselves: the training
# config's model and data-generation sections are unused by it.
IGNORED = fp.IGNORED_TRAIN_KEYS + ("model", "data.tasks", "data.knowledge", "data.seq_len",
                                   "data.num_train", "data.num_test")


@dataclasses.dataclass
class Trained:
    """A trained (or reused) model: ``info`` has ``reused_checkpoint``, ``step``,
    ``seconds``, ``seed``, ``fingerprint`` (hash prefix) and ``folder``."""

    model: Any
    params: Any
    info: dict


def train_config(train: ml_collections.ConfigDict, *, seed: int,
                 progress: bool = False) -> ml_collections.ConfigDict:
    """A :mod:`mechinterp.train` config from an experiment's short ``train`` section
    (``steps``, ``batch_size``, ``learning_rate``, ``warmup_steps``): AdamW with a cosine
    schedule, one synchronous checkpoint at the end, no periodic eval."""
    t = default_train_config()
    t.seed = seed
    t.data.batch_size = train.batch_size
    t.data.eval_batch_size = train.batch_size
    t.optimizer.learning_rate = train.learning_rate
    t.schedule.warmup_steps = train.warmup_steps
    t.train.steps = train.steps
    t.train.log_every = max(1, min(100, train.steps))
    t.train.eval_every = 0
    t.train.checkpoint_every = train.steps
    t.train.keep_checkpoints = 1
    t.train.async_checkpoints = False
    t.train.progress = progress
    t.train.tensorboard = False
    return t


def train_or_reuse(model, data, config: ml_collections.ConfigDict, folder: str | Path, *,
                   data_spec: Any = None, retrain: bool = False, eval_data=None,
                   **fit_kwargs) -> Trained:
    """Train ``model`` (any linen module) on ``data`` (a random-access source) as the
    :mod:`mechinterp.train` ``config`` says, in ``folder``; or reuse / resume the
    checkpoint there if it was trained with the same settings.

    The fingerprint covers the module's fields, ``data`` (length and a hash of a sample of
    examples) with ``data_spec`` (the settings that generated it) and ``config`` minus
    logging / checkpointing keys. A different one raises
    :class:`~mechinterp.train.fingerprint.FingerprintMismatch` unless ``retrain``.
    SIGTERM during training saves a checkpoint and raises
    :class:`~mechinterp.experiments.kit.run.Interrupted`. ``fit_kwargs`` go to ``fit``.
    """
    folder = Path(folder)
    config = resolve_config(config)
    print_ = fp.fingerprint(model=model, data={"source": fp.describe_source(data),
                                               "spec": data_spec}, train=config,
                            ignore=IGNORED)
    fp.guard(folder, print_, retrain=retrain)
    ckpt = folder / "checkpoints"
    previous = Checkpointer(ckpt).latest_step() if ckpt.exists() else None
    start = time.perf_counter()
    result = fit(config, folder, model, data, eval_data, **fit_kwargs)
    if result.stopped == "preempted":
        raise Interrupted(f"interrupted by SIGTERM at training step {result.step} (checkpoint "
                          f"saved in {folder}); run the same command again to resume")
    info = {"reused_checkpoint": previous == config.train.steps, "step": result.step,
            "seconds": time.perf_counter() - start, "seed": config.seed,
            "fingerprint": print_["hash"][:12], "folder": str(folder)}
    return Trained(model, result.state.params, info)


def training_note(info: dict) -> str:
    """How a model came about, for report headers."""
    if info["reused_checkpoint"]:
        return "model reused from an earlier run's checkpoint"
    return f"training took {info['seconds']:.0f} s"
