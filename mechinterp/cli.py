"""``mechinterp run CONFIG [key=value ...]`` and ``mechinterp plot RESULT``: the console.

A config is a Python file whose ``get_config(arg=None)`` returns an ``ml_collections``
``ConfigDict`` with at least ``job`` ("package.module:function") and ``workdir``.
``preset=NAME`` is routed to ``get_config("NAME")`` before the other ``key=value``
overrides (Python literals; an unknown key is an error), so overrides win over the preset.
The job is called as ``function(config, workdir)``; a job with a ``check_config(config)``
attribute has it called first, before the run folder is created or its config.json
written (a job marked ``writes_config`` writes config.json itself, after its own checks).
Details: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import ml_collections

from mechinterp import atomic, validate


def config_function(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_mechinterp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {str(path)!r} defines no get_config()")
    return module.get_config


def takes_arg(get_config) -> bool:
    """Whether ``get_config`` accepts a preset argument (``get_config(arg=None)``)."""
    return bool(inspect.signature(get_config).parameters)


def load_config(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file (``get_config()`` if it takes no argument and
    ``arg`` is None)."""
    get_config = config_function(path)
    if takes_arg(get_config):
        return get_config(arg)
    if arg is not None:
        raise TypeError(f"config file {str(path)!r}: get_config() takes no preset argument")
    return get_config()


def get_path(config, key: str):
    """``config["a"]["b"]`` for ``key="a.b"``; ``KeyError`` naming ``key`` if absent."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            raise KeyError(f"config has no key {key!r}") from None
    return node


def set_path(config, key: str, value) -> None:
    """``config["a"]["b"] = value`` for ``key="a.b"`` (the parent must exist)."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, prefix + key + "."))
    return keys


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Set ``key.sub=value`` overrides in place; unknown keys and bad types are errors."""
    known = _all_keys(config)
    for override in overrides:
        key, sep, text = override.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not of the form key=value")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"config has no key {key!r}{hint}")
        try:
            set_path(config, key, _parse_value(text))
        except TypeError as error:
            raise TypeError(f"override {key}={text!r}: {error}") from None


def resolve_job(spec: str):
    module_name, sep, function_name = spec.partition(":")
    if not sep:
        raise ValueError(f"config.job {spec!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), function_name)


def split_preset(overrides: list[str]) -> tuple[str | None, list[str]]:
    """``(preset, the other overrides)``: the last ``preset=NAME`` and the rest."""
    preset, rest = None, []
    for override in overrides:
        key, sep, text = override.removeprefix("--").removeprefix("config.").partition("=")
        if sep and key == "preset":
            preset = str(_parse_value(text))
        else:
            rest.append(override)
    return preset, rest


def resolve(config_path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The config of ``config_path`` with its preset and ``overrides`` applied."""
    get_config = config_function(config_path)
    if takes_arg(get_config):
        preset, overrides = split_preset(overrides)
        config = get_config(preset)
    else:
        config = get_config()
    apply_overrides(config, overrides)
    return config


def run(config_path: str, overrides: list[str]) -> Path:
    config = resolve(config_path, overrides)
    for required in ("job", "workdir"):
        if required not in config:
            raise KeyError(f"config {config_path!r} must define config.{required}")
    workdir = validate.check_workdir(config.workdir, "config.workdir")
    job = resolve_job(config.job)
    check_config = getattr(job, "check_config", None)
    if check_config is not None:  # the whole config is checked before the folder is touched
        check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    if not getattr(job, "writes_config", False):
        atomic.write_json(workdir / "config.json", config.to_dict(), default=str)
    job(config, workdir)
    return workdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechinterp")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run an experiment config")
    run_parser.add_argument("config", help="path to a configs/*.py file")
    run_parser.add_argument("overrides", nargs="*", help="key=value overrides")
    plot_parser = commands.add_parser("plot", help="render a saved 2-D result as a PNG heatmap")
    plot_parser.add_argument("result", help="a .npz written by SweepResult.save")
    plot_parser.add_argument("--out", help="PNG path (default: next to the result)")
    plot_parser.add_argument("--title", default=None)
    args, extra = parser.parse_known_args(argv)  # run: --config.key=value style overrides
    if args.command == "plot":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from mechinterp.plotting import heatmap
        from mechinterp.sweep import SweepResult

        out = args.out or str(Path(args.result).with_suffix(".png"))
        print(heatmap(SweepResult.load(args.result), out, title=args.title))
        return 0
    workdir = run(args.config, args.overrides + extra)
    print(f"done: {workdir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
