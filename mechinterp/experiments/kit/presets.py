"""Presets, big_vision style: ``configs/NAME.py`` holds the whole config.

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        ...                                   # every default, in the config file
        return kit.with_preset(c, PRESETS, arg)

    PRESETS = {"default": {}, "smoke": {"train.steps": 16, "model.d_model": 16}}

``arg`` is the preset's name (``None`` = ``"default"``). ``mechinterp run CONFIG
preset=smoke k=v`` calls ``get_config("smoke")`` first and applies ``k=v`` on top, so an
override always wins over the preset. An unknown preset is an error listing the known ones.
A preset value may also be a callable ``f(config)`` (e.g. one that raises to explain why a
preset is not automated).
"""

from __future__ import annotations

import ml_collections

from mechinterp.cli import get_path, set_path


class UnknownPreset(ValueError):
    """A preset name the config does not define."""


def with_preset(config: ml_collections.ConfigDict, presets: dict,
                arg: str | None) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``presets[arg]`` applied and ``config.preset = arg``.

    Every key a preset sets must exist in ``config`` (a typo is an error, not a new key).
    """
    name = arg or "default"
    if name not in presets:
        raise UnknownPreset(f"unknown preset {name!r}; known presets: "
                            f"{', '.join(sorted(presets))}")
    config = ml_collections.ConfigDict(config.to_dict())
    preset = presets[name]
    if callable(preset):
        preset(config)
    else:
        for key, value in preset.items():
            get_path(config, key)  # KeyError naming the key if the config lacks it
            set_path(config, key, value)
    config.preset = name
    return config


def common(config: ml_collections.ConfigDict, *, job: str, workdir: str) -> None:
    """The keys every kit experiment has, set in place: ``job``, ``workdir``, ``seed``
    (first training seed), ``seeds`` (how many independently trained models: seed,
    seed+1, ...), ``preset``, ``progress``, ``retrain`` (replace checkpoints trained with
    other settings) and ``overwrite`` (reuse a run folder whose config differs)."""
    config.job = job
    config.workdir = workdir
    config.seed = 0
    config.seeds = 1
    config.preset = "default"
    config.progress = True
    config.retrain = False
    config.overwrite = False
