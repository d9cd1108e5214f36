"""mechinterp.train: training on sharded meshes, from a laptop to a pod, with one code path.

``make_mesh`` builds the device mesh, ``make_optimizer`` / ``lr_schedule`` the optax
transform, ``init_train_state`` / ``abstract_train_state`` the sharded state under
``DEFAULT_RULES``, ``make_train_step`` the jitted step and ``global_batch`` a sharded
batch; or, config-driven, ``mechinterp run CONFIG`` with
``config.job = "mechinterp.train.loop:run"``.

Modules: ``mesh``, ``state``, ``step``, ``losses``, ``optim``, ``checkpoint`` (Orbax),
``tasks``, ``tokenizer``, ``data`` (tfds + grain), ``digits``, ``timeseries``, ``flop_counts``,
``config``, ``loop`` (``fit``, ``run``), ``transcoders`` (``train_transcoders``).

Design notes and a worked example: docs/training.md.
"""

from mechinterp.train.checkpoint import Checkpointer, StopSignal
from mechinterp.train.config import default_config, resolve_config
from mechinterp.train.data import (SyntheticTasks, batches, build_synthetic, shard_options,
                                   synthetic_tokenizer)
from mechinterp.train.digits import build_digits, rotate_image
from mechinterp.train.flop_counts import decoder_train_flops_per_token, mfu, peak_flops
from mechinterp.train.loop import FitResult, NonFiniteLossError, fit, run
from mechinterp.train.losses import OBJECTIVES, Objective
from mechinterp.train.mesh import (DEFAULT_RULES, MESH_AXES, batch_sharding, check_batch_size,
                                   check_rules, global_batch, make_mesh)
from mechinterp.train.optim import (freeze, get_multipliers, lr_schedule, make_optimizer,
                                    mask_gradients, scale_by_multipliers, set_gradient_masks,
                                    set_multipliers)
from mechinterp.train.state import (TrainState, abstract_train_state, init_train_state,
                                    replace_params, shardings_of)
from mechinterp.train.step import AUX_LOSS, make_eval_step, make_train_step
from mechinterp.train.tasks import (Arithmetic, FactRecall, InContextChain, KnowledgeBase,
                                    MultiHop, TaskMixture, mixture_from_config)
from mechinterp.train.timeseries import build_timeseries, load_series, normalization
from mechinterp.train.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from mechinterp.train.transcoders import train_transcoders  # after fit: it trains with it

__all__ = [
    "abstract_train_state", "Arithmetic", "AUX_LOSS", "batch_sharding", "batches",
    "build_digits", "build_synthetic", "build_timeseries", "HFTokenizer", "load_series",
    "load_tokenizer", "normalization", "rotate_image", "check_batch_size", "check_rules", "Checkpointer",
    "decoder_train_flops_per_token", "default_config", "DEFAULT_RULES", "FactRecall", "fit",
    "FitResult", "freeze", "get_multipliers", "global_batch", "InContextChain",
    "init_train_state", "KnowledgeBase", "lr_schedule", "make_eval_step", "make_mesh",
    "make_optimizer", "make_train_step", "mask_gradients", "MESH_AXES", "mfu",
    "mixture_from_config", "MultiHop", "NonFiniteLossError", "Objective", "OBJECTIVES",
    "peak_flops", "replace_params", "resolve_config", "run", "scale_by_multipliers",
    "set_gradient_masks",
    "set_multipliers", "shard_options", "shardings_of", "StopSignal", "synthetic_tokenizer",
    "SyntheticTasks", "TaskMixture", "TrainState", "train_transcoders", "WordTokenizer",
]
