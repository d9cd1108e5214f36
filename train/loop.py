"""The training loop: progress bar, periodic eval, JSONL metrics, checkpoints, resume.

:func:`fit` trains any linen model on a random-access data source; :func:`run` is the
``mechinterp run`` job that builds a decoder and synthetic-task data first. Starting on a
folder with checkpoints resumes from the latest one; :func:`run` refuses a folder whose
checkpoints came from other settings (``fingerprint.json``) unless ``retrain=True``.
SIGTERM checkpoints and stops; a NaN/inf loss stops with an error naming the step, and no
state past the last finite step is saved. Run-folder layout: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mechinterp.models import Decoder, DecoderConfig
from mechinterp.train import fingerprint as fingerprint_lib
from mechinterp.train import flop_counts
from mechinterp.train.checkpoint import Checkpointer, StopSignal
from mechinterp import atomic, validate
from mechinterp.train.config import resolve_config
from mechinterp.train.data import batches, build_synthetic, synthetic_tokenizer
from mechinterp.train.losses import Objective, get_objective
from mechinterp.train.mesh import check_batch_size, check_rules, global_batch, make_mesh
from mechinterp.train.optim import lr_schedule, make_optimizer
from mechinterp.train.state import (TrainState, abstract_train_state, init_train_state,
                                    replace_params, shardings_of)
from mechinterp.train.step import make_eval_step, make_train_step, summarize
from mechinterp.train.tasks import mixture_from_config


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class FitResult:
    """The final state, the step reached, why the loop ended ("done" or "preempted"), and
    the last train and eval metrics."""

    state: TrainState
    step: int
    stopped: str
    train: dict[str, float]
    eval: dict[str, float] | None


def _records(path: Path) -> list[str]:
    """The JSONL lines of ``path``; a truncated last line (a run killed mid-write) is
    dropped with a warning, a broken line elsewhere is an error naming file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines):
                logging.getLogger(__name__).warning(
                    "%s: dropping its last line, a record cut off mid-write (%s)", path, error)
                return lines[:-1]
            raise ValueError(f"{path}, line {number}: not a metrics record ({error}): "
                             f"{line[:80]!r}") from None
    return lines


class MetricsLog:
    """Append-only JSONL metrics; on resume, records past ``resume_step`` are dropped.

    With ``tensorboard_dir``, every record is also written there as TensorBoard scalars
    tagged ``KIND/NAME`` (flushed at each write; events past ``resume_step`` are purged).
    Use as a context manager to close the TensorBoard writer.
    """

    def __init__(self, path: Path, resume_step: int = 0, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if jax.process_index() == 0:
            if path.exists():
                kept = [line for line in _records(path) if json.loads(line)["step"] <= resume_step]
                atomic.write_text(path, "".join(line + "\n" for line in kept))
            if tensorboard_dir is not None:
                # Imported here: tensorboardX imports torch when it is installed (seconds).
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)

    def write(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        record = {"kind": kind, "step": step, **{k: float(v) for k, v in metrics.items()}}
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{kind}/{name}", float(value), step)
            self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def build_optimizer(config: ml_collections.ConfigDict):
    """``(tx, schedule)`` from ``config.optimizer`` and ``config.schedule``."""
    o, s = config.optimizer, config.schedule
    schedule = lr_schedule(s.name, o.learning_rate, warmup_steps=s.warmup_steps,
                           total_steps=config.train.steps, end_factor=s.end_factor)
    tx = make_optimizer(
        o.name, schedule, b1=o.b1, b2=o.b2, eps=o.eps, momentum=o.momentum,
        weight_decay=o.weight_decay, clip_norm=o.clip_norm, freeze_patterns=o.freeze,
        lr_multipliers=tuple(tuple(pair) for pair in o.lr_multipliers),
    )
    return tx, schedule


def evaluate(eval_step, params, source, *, batch_size: int, mesh, rules,
             max_batches: int = 0) -> dict[str, float]:
    """Mean metrics over ``source`` (one pass, in order; a final partial batch is
    dropped), or over its first ``max_batches`` batches."""
    totals, n = None, 0
    for local in batches(source, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1):
        sums = eval_step(params, global_batch(local, mesh, rules))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        n += 1
        if max_batches and n >= max_batches:
            break
    return summarize(totals, n)


def _first_input_specs(source, objective) -> tuple:
    example = {k: np.asarray(v)[None] for k, v in source[0].items()}
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in objective.inputs(example))


def _checked_batch(model, objective, local):
    """A host batch whose token ids are checked against the model's vocabulary (JAX gathers
    do not check bounds; one min/max over the host batch per step)."""
    inputs = objective.inputs(local)
    tokens, _ = validate.token_inputs(model, inputs, {})
    if tokens is not None:
        validate.check_token_ids(np.asarray(tokens), model.vocab_size,
                                 "training batch 'tokens'")
    return local


def _params_finite(params) -> bool:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(params)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(jax.device_get(jnp.all(jnp.stack(leaves)))) if leaves else True


def _mean(records: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def fit(config: ml_collections.ConfigDict, workdir: str | Path, model: nn.Module,
        train_source, eval_source=None, *, flops_per_token: float | None = None,
        on_step: Callable[[int, TrainState], TrainState | None] | None = None,
        init_params: Mapping[str, Any] | None = None,
        objective: Objective | None = None) -> FitResult:
    """Train ``model`` on ``train_source`` as ``config`` says; see the module docstring.

    ``flops_per_token``: training FLOPs per token, for MFU (omit to skip MFU).
    ``on_step(step, state)``: called after every step; it may return a new state (e.g.
    with learning-rate multipliers changed by :func:`.optim.set_multipliers`).
    ``init_params``: values for some parameters instead of their fresh initialization, a
    nested dict mirroring part of the model's parameters (a pretrained model to fine-tune,
    or to freeze with ``config.optimizer.freeze``); see :func:`.state.replace_params`. A
    checkpoint in ``workdir`` wins over it (a resumed run continues from its own state).
    ``objective``: an :class:`~.losses.Objective` object instead of the one
    ``config.train.objective`` names (for objectives with parameters of their own).
    """
    workdir = validate.check_workdir(workdir)
    config = resolve_config(config)
    t = config.train
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.mesh)
    rules = check_rules(config.rules, mesh)
    check_batch_size(config.data.batch_size, mesh, rules, t.grad_accum)
    if eval_source is not None:
        check_batch_size(config.data.eval_batch_size, mesh, rules)
    objective = get_objective(objective or t.objective)
    compute_dtype = jnp.dtype(t.compute_dtype) if t.compute_dtype else None
    tx, schedule = build_optimizer(config)

    inputs = _first_input_specs(train_source, objective)
    abstract = abstract_train_state(model, tx, inputs, mesh=mesh, rules=rules, seed=config.seed)
    shardings = shardings_of(abstract)
    train_iter = batches(train_source, batch_size=config.data.batch_size, seed=config.seed)
    with Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints,
                      every=t.checkpoint_every, async_save=t.async_checkpoints) as checkpointer:
        start = checkpointer.latest_step()
        if start is None:
            start, state = 0, init_train_state(model, tx, inputs, mesh=mesh, rules=rules,
                                               seed=config.seed)
            if init_params is not None:
                state = replace_params(state, init_params)
        elif start > t.steps:
            raise ValueError(
                f"train.steps={t.steps} is below the step of the checkpoint in "
                f"{checkpointer.directory} (step {start}): that run is already past it. Raise "
                "train.steps to continue it, or use another workdir to train anew")
        else:
            state = checkpointer.restore(abstract, train_iter, step=start)
        train_step = make_train_step(model, tx, shardings, mesh=mesh, rules=rules,
                                     objective=objective, grad_accum=t.grad_accum,
                                     compute_dtype=compute_dtype, lr_schedule=schedule)
        eval_step = make_eval_step(model, shardings.params, mesh=mesh, rules=rules,
                                   objective=objective, compute_dtype=compute_dtype)
        loop = _Loop(config, workdir, start, checkpointer,
                     tokens_per_example=(math.prod(inputs[0].shape[1:])
                                         if objective.name == "next_token" else None),
                     flops_per_token=flops_per_token)
        evaluate_now = None if eval_source is None else functools.partial(
            evaluate, eval_step, source=eval_source, batch_size=config.data.eval_batch_size,
            mesh=mesh, rules=rules, max_batches=t.eval_batches)
        with loop.log:
            state, stopped = loop.run(state, train_step, train_iter,
                                      lambda local: global_batch(
                                          _checked_batch(model, objective, local), mesh, rules),
                                      evaluate_now, on_step)
    return FitResult(state=state, step=loop.step, stopped=stopped, train=loop.last_train,
                     eval=loop.last_eval)


class _Loop:
    """The step loop of :func:`fit`: logging, throughput, NaN checks, eval, checkpoints.

    Step metrics stay on device until a log, eval or checkpoint point, where they are
    fetched together and checked, so the host does not wait on every step.
    """

    def __init__(self, config, workdir: Path, start: int, checkpointer: Checkpointer, *,
                 tokens_per_example: int | None, flops_per_token: float | None):
        self.config, self.train = config, config.train
        self.step = start
        self.checkpointer = checkpointer
        self.log = MetricsLog(workdir / "metrics.jsonl", resume_step=start,
                              tensorboard_dir=workdir / "tensorboard" if self.train.tensorboard
                              else None)
        self.tokens_per_example = tokens_per_example
        self.flops_per_token = flops_per_token
        self.peak = self.train.peak_flops or flop_counts.peak_flops()
        self.pending: list[tuple[int, dict]] = []  # (step, metrics on device), unchecked
        self.interval: list[dict] = []  # checked metrics since the last train log
        self.clock: float | None = None  # when the current timing interval started
        self.timed_steps = 0
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] | None = None

    def check(self) -> None:
        """Fetch pending metrics; raise on the first non-finite loss or gradient norm."""
        fetched = jax.device_get([m for _, m in self.pending])
        for (step, _), m in zip(self.pending, fetched):
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                self.checkpointer.wait()
                raise NonFiniteLossError(
                    f"loss is {m['loss']} (gradient norm {m['grad_norm']}) at step {step}; "
                    f"stopped. The last good checkpoint is step "
                    f"{self.checkpointer.latest_step()} in {self.checkpointer.directory}"
                )
        self.pending.clear()
        self.interval.extend(fetched)

    def restart_clock(self) -> None:
        self.clock, self.timed_steps = time.perf_counter(), 0

    def log_train(self) -> None:
        self.check()
        metrics = _mean(self.interval)
        self.interval.clear()
        if self.clock is not None and self.timed_steps:
            seconds = (time.perf_counter() - self.clock) / self.timed_steps
            batch = self.config.data.batch_size
            metrics["examples_per_s"] = batch / seconds
            if self.tokens_per_example:
                tokens = batch * self.tokens_per_example
                metrics["tokens_per_s"] = tokens / seconds
                utilization = flop_counts.mfu((self.flops_per_token or 0) * tokens, seconds,
                                            jax.device_count(), self.peak)
                if utilization:
                    metrics["mfu"] = utilization
        self.restart_clock()
        self.log.write("train", self.step, metrics)
        self.last_train = metrics

    def run(self, state, train_step, train_iter, to_global, evaluate_now, on_step):
        """Train from ``self.step`` to ``config.train.steps``; ``(state, why it stopped)``.

        ``train_iter`` yields this host's batches (its position is checkpointed);
        ``to_global`` assembles them into global arrays.
        """
        t = self.train
        stopped = "done"
        with StopSignal() as stop, tqdm(total=t.steps, initial=self.step, desc="train",
                                        disable=not t.progress or jax.process_index() > 0) as bar:
            while self.step < t.steps:
                state, metrics = train_step(state, to_global(next(train_iter)))
                self.step += 1
                self.pending.append((self.step, metrics))
                self.timed_steps += 1
                if on_step is not None:
                    state = on_step(self.step, state) or state
                last = self.step == t.steps
                if self.clock is None:  # the first step compiled: time from here
                    self.check()
                    self.restart_clock()
                if last or self.step % t.log_every == 0:
                    self.log_train()
                    bar.set_postfix(loss=f"{self.last_train['loss']:.4f}")
                if evaluate_now is not None and (
                        last or (t.eval_every and self.step % t.eval_every == 0)):
                    self.last_eval = evaluate_now(state.params)
                    self.log.write("eval", self.step, self.last_eval)
                    self.restart_clock()
                # One process: SIGTERM. Several: JAX's preemption sync point, so that every
                # process stops at the same step.
                preempted = self.checkpointer.reached_preemption(self.step) or (
                    jax.process_count() == 1 and stop.requested)
                if preempted or last or self.checkpointer.should_save(self.step):
                    self.check()
                    if not _params_finite(state.params):  # good = finite loss and params
                        self.checkpointer.wait()
                        raise NonFiniteLossError(
                            f"the parameters after step {self.step} hold NaN or inf (the loss "
                            "was still finite); stopped without saving them. The last good "
                            f"checkpoint is step {self.checkpointer.latest_step()} in "
                            f"{self.checkpointer.directory}")
                    self.checkpointer.save(self.step, state, train_iter,
                                           force=preempted or last)
                bar.update(1)
                if preempted:
                    stopped = "preempted"
                    break
        if self.pending or self.interval:
            self.log_train()
        return state, stopped


def decoder_config(model: Mapping[str, Any], vocab_size: int):
    """A ``DecoderConfig`` from ``config.model`` (``vocab_size`` 0 -> ``vocab_size``)."""
    fields = dict(model)
    allowed = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise KeyError(f"config.model has unknown keys {unknown}; DecoderConfig fields are "
                       f"{sorted(allowed)}")
    if not fields.get("vocab_size"):
        fields["vocab_size"] = vocab_size
    elif fields["vocab_size"] < vocab_size:
        raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than "
                         f"the tokenizer's {vocab_size} words")
    return DecoderConfig(**fields)


def _report(config, result: FitResult, workdir: Path) -> str:
    def table(metrics):
        return "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()))

    lines = [
        f"# Training run: {workdir.name}", "",
        f"- stopped: **{result.stopped}** at step {result.step} of {config.train.steps}",
        f"- tasks: {sorted(config.data.tasks)}; model: {dict(config.model)}",
        "- files: `metrics.jsonl`, `checkpoints/`, `config.json`", "",
        "## Last train metrics", "", "| metric | value |", "|---|---|",
        table(result.train), "",
    ]
    if result.eval:
        lines += ["## Last eval metrics (test split)", "", "| metric | value |", "|---|---|",
                  table(result.eval), ""]
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> FitResult:
    """The ``mechinterp run`` job: a decoder on the synthetic task mixture of the config.

    A workdir whose checkpoints were trained with other settings is refused
    (:func:`mechinterp.train.fingerprint.guard`, naming the differing keys) unless the
    config sets ``retrain = True`` (a key outside the training config proper, so a config
    file that wants the switch on the command line defines ``config.retrain = False``).
    """
    workdir = validate.check_workdir(workdir)
    config, retrain = check_config(config)
    if config.distributed:
        jax.distributed.initialize()
    workdir.mkdir(parents=True, exist_ok=True)
    d = config.data
    mixture = mixture_from_config(d.tasks, knowledge=d.knowledge, seq_len=d.seq_len,
                                  seed=config.seed)
    builder = build_synthetic(mixture, num_train=d.num_train, num_test=d.num_test,
                              data_dir=d.dir or workdir / "data")
    decoder = decoder_config(config.model, synthetic_tokenizer(builder).vocab_size)
    train_source = builder.as_data_source("train")
    fingerprint_lib.guard(workdir, fingerprint_lib.fingerprint(
        model=Decoder(decoder), data=fingerprint_lib.describe_source(train_source),
        train=config), retrain=retrain)
    # written only now: a config that fails a check above, or whose checkpoints are another
    # run's, leaves the folder's config.json (the finished run's) as it was
    atomic.write_json(workdir / "config.json", config.to_dict(), default=str)
    result = fit(config, workdir, Decoder(decoder), train_source,
                 builder.as_data_source("test") if d.num_test else None,
                 flops_per_token=flop_counts.decoder_train_flops_per_token(decoder, d.seq_len))
    atomic.write_text(workdir / "report.md", _report(config, result, workdir))
    return result


def check_config(config) -> tuple[ml_collections.ConfigDict, bool]:
    """``(resolved training config, retrain)`` of :func:`run`'s config; raises on a bad
    value (the keys and counts, the optimizer and schedule, the model's fields; the vocabulary
    size is checked once the tokenizer exists). ``mechinterp run`` calls it before creating
    the run folder."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    retrain = bool(raw.pop("retrain", False))
    resolved = resolve_config(raw)
    build_optimizer(resolved)  # schedule and optimizer settings (warmup beyond the steps, ...)
    decoder_config(resolved.model, vocab_size=max(resolved.model.get("vocab_size") or 1, 1))
    return resolved, retrain


run.check_config = check_config
run.writes_config = True  # after its checks and the fingerprint guard (see run)
