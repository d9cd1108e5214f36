"""The console: config overrides, errors for unknown keys, and `mechinterp plot`."""

import json

import numpy as np
import pytest

from mechinterp import cli
from mechinterp.sweep import SweepResult

CONFIG = '''
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.job = "test_cli_and_plots:record_job"
    c.workdir = {workdir!r}
    c.model = ml_collections.ConfigDict({{"d_model": 8, "name": "tiny"}})
    c.steps = 3
    return c
'''

SEEN = {}


def record_job(config, workdir):
    SEEN["config"] = config


def test_run_applies_overrides_and_writes_resolved_config(config_file, tmp_path):
    assert cli.main(["run", str(config_file), "steps=7", "--config.model.d_model=16",
                     "model.name=big"]) == 0
    config = SEEN["config"]
    assert (config.steps, config.model.d_model, config.model.name) == (7, 16, "big")
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["steps"] == 7 and written["model"]["d_model"] == 16


def test_unknown_key_and_bad_type_are_errors(config_file):
    with pytest.raises(KeyError, match="config has no key 'step'; did you mean steps"):
        cli.main(["run", str(config_file), "step=7"])
    with pytest.raises(TypeError, match="override steps='many'"):
        cli.main(["run", str(config_file), "steps=many"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        cli.main(["run", str(config_file), "steps"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["run", "no/such/config.py"])


def test_plot_renders_a_saved_result(tmp_path):
    result = SweepResult(np.arange(12.0).reshape(3, 4) - 5, ("layer", "pos"),
                         {"pos": ["<bos>", "The", "cat", "sat"]})
    result.save(tmp_path / "grid.npz")
    loaded = SweepResult.load(tmp_path / "grid.npz")
    np.testing.assert_array_equal(loaded.values, result.values)
    assert loaded.axes == result.axes and loaded.labels == result.labels
    assert cli.main(["plot", str(tmp_path / "grid.npz")]) == 0
    png = (tmp_path / "grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_plot_refuses_non_2d(tmp_path):
    from mechinterp.plotting import heatmap

    with pytest.raises(ValueError, match="heatmap needs a 2-D result"):
        heatmap(SweepResult(np.zeros((2, 3, 4)), ("a", "b", "c")), tmp_path / "x.png")
