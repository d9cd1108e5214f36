"""Checkpoints with Orbax: async saves, keep-N, preemption, data-iterator state, resharding.

A checkpoint is one step folder holding two items: ``state`` (the :class:`TrainState`,
every array written by the hosts that own its shards) and ``data`` (each host's grain
iterator position), so a resumed run continues with the same parameters, optimizer
state and batches.

Saves are asynchronous (training continues while arrays are written) and atomic: Orbax
writes into a temporary folder and renames it when complete, writing
``commit_success.txt`` last. A step folder without that file is an interrupted save; it is
deleted when the checkpointer opens, so the previous checkpoint stays the latest.

Restoring reads into any target shardings (e.g. a different mesh). Before reading, the
checkpoint's shapes are compared with the model's, and a mismatch names the parameters.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mechinterp.train.mesh import path_str

COMMIT_FILE = "commit_success.txt"

log = logging.getLogger(__name__)


def _remove_uncommitted(directory: Path) -> None:
    """Delete step folders (named by an integer) that have no commit file."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.is_dir() and child.name.isdigit() and not (child / COMMIT_FILE).exists():
            log.warning("removing interrupted checkpoint %s (no %s)", child, COMMIT_FILE)
            shutil.rmtree(child)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_str(path): tuple(leaf.shape) for path, leaf in leaves}


def check_compatible(saved, target, where: str) -> None:
    """Raise if the saved state's structure or shapes differ from ``target``'s."""
    saved, target = _shapes(saved), _shapes(target)
    problems = []
    for name in sorted(set(saved) | set(target), key=lambda n: (not n.startswith("params"), n)):
        if name not in saved:
            problems.append(f"{name!r} is missing from the checkpoint")
        elif name not in target:
            problems.append(f"{name!r} is in the checkpoint but not in this model")
        elif saved[name] != target[name]:
            problems.append(f"{name!r} has shape {saved[name]} in the checkpoint but "
                            f"{target[name]} in this model")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"the checkpoint at {where} does not fit this model/optimizer: "
            + "; ".join(problems[:5]) + more
            + ". Restore it into the model it was saved from, or start a new directory."
        )


class Checkpointer:
    """An Orbax ``CheckpointManager`` for a train state and a grain data iterator.

    ``keep``: how many checkpoints to keep (oldest deleted first). ``every``: save only
    when ``step % every == 0`` unless ``force=True``. Use as a context manager, or call
    :meth:`close` (it waits for pending saves).
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, every: int = 1,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        _remove_uncommitted(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` would save without ``force``."""
        return step % self.every == 0

    def save(self, step: int, state, data_iterator: grain.DatasetIterator | None = None, *,
             force: bool = False) -> bool:
        """Start saving ``state`` (and the iterator's position) as ``step``; return whether
        a save started (``False`` between intervals). Returns before arrays are written."""
        if not (force or self.should_save(step)):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, abstract_state, data_iterator: grain.DatasetIterator | None = None, *,
                step: int | None = None):
        """The state saved at ``step`` (default: latest) laid out as ``abstract_state``
        (``ShapeDtypeStruct`` s with shardings), and the iterator moved to its position."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        where = f"{self.directory}/{step}"
        metadata = self._state_metadata(step, where)
        check_compatible(metadata.tree, abstract_state, where)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (self.directory / str(step) / "data").is_dir():
                raise ValueError(f"the checkpoint at {where} has no data-iterator state")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def _state_metadata(self, step: int, where: str):
        """The ``state`` item's metadata; a step folder without a readable ``state/`` item
        (emptied, or copied in part) is an error naming it, not an Orbax traceback."""
        folder = self.directory / str(step)
        if not (folder / "state").is_dir():
            held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise FileNotFoundError(
                f"the checkpoint at {where} has no state/ item (the step folder "
                + (f"holds only {held}" if held else "is empty")
                + f"): it is incomplete. Delete {where} to resume from the previous checkpoint "
                f"(steps here: {self.all_steps()}), or restore it from a full copy.")
        try:
            return self.manager.item_metadata(step)["state"]
        except Exception as error:  # noqa: BLE001 (any Orbax/tensorstore failure)
            raise ValueError(f"the checkpoint at {where} has an unreadable state/ item "
                             f"({type(error).__name__}: {error}); delete {where} to resume "
                             "from the previous checkpoint") from error

    def reached_preemption(self, step: int) -> bool:
        """Whether the cluster announced a preemption (multi-host sync point)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StopSignal:
    """Records SIGTERM (preemption notice) instead of dying, while active.

    ``with StopSignal() as stop: ... if stop.requested: save and exit``. Restores the
    previous handler on exit. Only the main thread can install signal handlers; elsewhere
    this is inert (``requested`` stays False).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        log.warning("received signal %d: will checkpoint and stop after this step", signum)
        self.requested = True

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
