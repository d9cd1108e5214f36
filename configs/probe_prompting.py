"""Probe prompting on a small two-hop model (METHODS.md item 2).

    mechinterp run configs/probe_prompting.py                 # default, ~5 min on 2 CPU cores
    mechinterp run configs/probe_prompting.py preset=smoke    # ~1 min; the CI smoke test
    mechinterp run configs/probe_prompting.py transcoder.activation=jumprelu

Trains a decoder on "capital of the state containing CITY" two-hop prompts, one transcoder
per layer, builds and prunes attribution graphs for a few prompts, checks feature
ablations against the graphs' predictions, runs probe prompting and writes
``WORKDIR/report.md`` (see :mod:`mechinterp.experiments.probe_prompting`).
"""

from mechinterp.experiments.probe_prompting import default_config


def get_config():
    return default_config()
