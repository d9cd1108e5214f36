"""The training config: defaults, and strict validation (an unknown key is an error).

:func:`default_config` is the starting point of a config file's ``get_config()``;
:func:`resolve_config` fills in missing keys from the defaults and rejects unknown ones
(with close matches). Open sections (``model``, ``mesh``, ``data.knowledge``,
``data.tasks``) are checked where they are used. Design notes: docs/training.md.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import ml_collections

from mechinterp.train.mesh import DEFAULT_RULES

# Sections whose keys are checked where they are used (against a dataclass, the mesh axes).
OPEN = ("model", "mesh", "data.knowledge")  # merged over the defaults
REPLACED = ("data.tasks",)  # replaces the default as a whole


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with its default."""
    c = ml_collections.ConfigDict()
    c.job = "mechinterp.train.loop:run"
    c.workdir = ""
    c.seed = 0
    c.distributed = False  # call jax.distributed.initialize() (multi-host launches)
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
    c.rules = DEFAULT_RULES

    # DecoderConfig fields; vocab_size 0 takes the tokenizer's size.
    c.model = {"vocab_size": 0, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_mlp": 256,
               "dtype": "float32", "param_dtype": "float32"}

    c.data = ml_collections.ConfigDict()
    c.data.tasks = {"recall": {}}
    c.data.knowledge = {"n_entities": 32, "n_relations": 4}
    c.data.seq_len = 32
    c.data.num_train = 10_000
    c.data.num_test = 512
    c.data.dir = ""  # default: WORKDIR/data
    c.data.batch_size = 32
    c.data.eval_batch_size = 64

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0
    c.optimizer.freeze = ()  # regex patterns of parameter paths
    c.optimizer.lr_multipliers = ()  # ((pattern, multiplier), ...)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 50
    c.schedule.end_factor = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.grad_accum = 1
    c.train.compute_dtype = ""  # "" keeps the parameters' dtype; e.g. "bfloat16"
    c.train.objective = "next_token"
    c.train.log_every = 50
    c.train.eval_every = 200  # and at the end; 0: only at the end
    c.train.eval_batches = 0  # 0: the whole test split
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.peak_flops = 0.0  # per device; 0 looks the device up (mfu.PEAK_FLOPS)
    c.train.progress = True
    c.train.tensorboard = True  # also write metrics to WORKDIR/tensorboard (tensorboardX)
    return c


def _check(config: Mapping, defaults: Mapping, prefix: str = "") -> None:
    for key, value in config.items():
        name = prefix + key
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"; did you mean {', '.join(prefix + k for k in close)}?" if close else ""
            raise KeyError(f"unknown config key {name!r}{hint}")
        if isinstance(defaults[key], Mapping) != isinstance(value, Mapping):
            raise TypeError(f"config key {name!r} must be "
                            f"{'a section' if isinstance(defaults[key], Mapping) else 'a value'}")
        if isinstance(value, Mapping) and name not in OPEN + REPLACED:
            _check(value, defaults[key], name + ".")


def _merge(defaults: dict, config: Mapping, prefix: str = "") -> dict:
    merged = dict(defaults)
    for key, value in config.items():
        name = prefix + key
        if name in OPEN:
            merged[key] = {**defaults[key], **value}
        elif isinstance(value, Mapping) and name not in REPLACED:
            merged[key] = _merge(defaults[key], value, name + ".")
        else:
            merged[key] = value
    return merged


# Counts that must be >= 1 (0 or a negative value would never log, never checkpoint, train
# nothing or keep no checkpoint), and >= 0 (0 means "only at the end" / "all").
POSITIVE = ("train.steps", "train.log_every", "train.checkpoint_every",
            "train.keep_checkpoints", "train.grad_accum", "data.seq_len", "data.batch_size",
            "data.eval_batch_size")
NON_NEGATIVE = ("train.eval_every", "train.eval_batches", "schedule.warmup_steps")


def _check_values(config: Mapping) -> None:
    """Refuse counts out of range when the config is read, not mid-run.

    ``train.keep_checkpoints=0`` is refused (it would finish with no checkpoint at all):
    ``1`` keeps only the latest, which is always the final step's.
    """
    def get(name):
        node = config
        for key in name.split("."):
            node = node[key]
        return node

    for name in POSITIVE + NON_NEGATIVE:
        value = get(name)
        low = 1 if name in POSITIVE else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            extra = (" (0 would finish with no checkpoint at all; 1 keeps the final one)"
                     if name == "train.keep_checkpoints" else "")
            raise ValueError(f"config {name}={value!r} must be an int >= {low}{extra}")


def resolve_config(config: Mapping | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` completed from :func:`default_config`; unknown keys raise ``KeyError``,
    counts out of range (``train.steps=0``, ``log_every``/``checkpoint_every`` <= 0,
    ``keep_checkpoints=0``, ...) ``ValueError`` naming the key."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    defaults = default_config().to_dict()
    _check(raw, defaults)
    merged = _merge(defaults, raw)
    _check_values(merged)
    return ml_collections.ConfigDict(merged)
