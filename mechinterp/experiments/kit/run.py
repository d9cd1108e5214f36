"""The run folder: one object that owns ``WORKDIR`` for the length of a job.

    @kit.job
    def run(config, workdir):
        with kit.Run(config, workdir) as r:
            with r.phase("train"):
                ...
            r.write_results({"accuracy": acc}, arrays={"grid": grid})
            r.write_report(lines)

It writes config.json, run.json (status running / complete / interrupted / failed,
timings), results.json/npz, figures and report.md; refuses a folder with other settings
unless ``overwrite``; on SIGTERM exits 143 marked interrupted. Details: docs/experiments.md.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from pathlib import Path

import ml_collections
import numpy as np

from mechinterp import atomic, validate
from mechinterp.experiments.kit import jsonio, plots
from mechinterp.train.checkpoint import StopSignal
from mechinterp.train.fingerprint import differences, flatten, numbered_folder, without

IGNORED = ("workdir", "progress", "overwrite", "retrain")  # do not change the results
EXIT_INTERRUPTED = 143


class Interrupted(SystemExit):
    """The run stopped on SIGTERM after saving its checkpoint (exit status 143)."""

    def __init__(self, message: str = "interrupted by SIGTERM"):
        super().__init__(EXIT_INTERRUPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RunFolderMismatch(ValueError):
    """The run folder holds a run with other settings."""


def job(fn):
    """Mark a ``job(config, workdir)`` function as writing its own ``config.json`` (through
    :class:`Run`), so the CLI leaves the folder's existing one alone until it is checked."""
    fn.writes_config = True
    return fn


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Run:
    """``WORKDIR`` of one job; use as a context manager (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path | None = None,
                 *, ignore: tuple[str, ...] = IGNORED):
        self.config = config
        self.workdir = validate.check_workdir(
            workdir if workdir is not None else config.get("workdir"))
        self.ignore = ignore
        self.timings: dict[str, float] = {}
        self.figures: list[str] = []
        self._stop = StopSignal()
        self._started = None
        self._clock = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Run":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_config()
        jsonio.write_json(self.workdir / "config.json", self.config.to_dict())
        self._started, self._clock = _now(), time.perf_counter()
        self._write_status("running")
        self._stop.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.__exit__(exc_type, exc, tb)
        self.timings["total"] = time.perf_counter() - self._clock
        if exc is None:
            self._write_status("complete")
        elif isinstance(exc, (Interrupted, KeyboardInterrupt)):
            self._write_status("interrupted", str(exc) or type(exc).__name__)
        else:
            self._write_status("failed", f"{type(exc).__name__}: {exc}")
        return False

    def _write_status(self, status: str, error: str | None = None) -> None:
        record = {"status": status, "started": self._started, "pid": os.getpid(),
                  "preset": self.config.get("preset"), "timings_s": self.timings,
                  "figures": self.figures}
        if status != "running":
            record["finished"] = _now()
        if error:
            record["error"] = error
        jsonio.write_json(self.workdir / "run.json", record)

    def _settings(self, config: dict) -> dict:
        return without(flatten(config), self.ignore)

    def _check_not_running(self) -> None:
        path = self.workdir / "run.json"
        if not path.exists():
            return
        status = json.loads(path.read_text())
        pid = status.get("pid")
        if status.get("status") != "running" or not pid or pid == os.getpid():
            return
        try:
            os.kill(pid, 0)
        except OSError:
            return  # the process is gone: a crashed or killed run, safe to continue
        raise RunFolderMismatch(f"{self.workdir} is in use by a running job (pid {pid}); "
                                "wait for it or use another workdir")

    def _check_config(self) -> None:
        self._check_not_running()
        path = self.workdir / "config.json"
        if not path.exists():
            return
        new = json.loads(jsonio.dumps(self.config.to_dict()))
        diff = differences(self._settings(json.loads(path.read_text())), self._settings(new))
        if not diff:
            return
        if not self.config.get("overwrite", False):
            raise RunFolderMismatch(
                f"{self.workdir} holds a run with other settings: {'; '.join(diff[:12])}"
                f"{' ...' if len(diff) > 12 else ''}. Use another workdir, or pass "
                "overwrite=True to run here (the previous results move to previous/<n>/; "
                "checkpoints stay and are reused only where their fingerprints match).")
        aside = numbered_folder(self.workdir / "previous")
        for child in list(self.workdir.iterdir()):
            if child.is_file():
                child.rename(aside / child.name)

    # ------------------------------------------------------------------ during the run
    @property
    def stop_requested(self) -> bool:
        return self._stop.requested

    def check_stop(self) -> None:
        """Raise :class:`Interrupted` if SIGTERM arrived."""
        if self._stop.requested:
            raise Interrupted("interrupted by SIGTERM; run the same command again to resume")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase into ``timings[name]`` (accumulating); stop at its boundaries if
        SIGTERM arrived."""
        self.check_stop()
        t0 = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        self.check_stop()

    def path(self, name: str) -> Path:
        path = self.workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def figure(self, name: str, *subplots_args, **subplots_kwargs):
        """:func:`mechinterp.experiments.kit.plots.figure` saving ``WORKDIR/name``."""
        with plots.figure(self.path(name), *subplots_args, **subplots_kwargs) as fig_axes:
            yield fig_axes
        self.figures.append(name)

    def write_results(self, results: dict, arrays: dict | None = None) -> None:
        """``results.json`` (plus ``timings_s`` so far) and, with ``arrays``, ``results.npz``."""
        self.timings["total"] = time.perf_counter() - self._clock
        jsonio.write_json(self.workdir / "results.json",
                          {**results, "timings_s": dict(self.timings)})
        if arrays is not None:
            with atomic.writing(self.workdir / "results.npz", "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

    def write_report(self, lines: list[str] | str) -> Path:
        text = lines if isinstance(lines, str) else "\n".join(lines)
        return atomic.write_text(self.workdir / "report.md", text.rstrip("\n") + "\n")
