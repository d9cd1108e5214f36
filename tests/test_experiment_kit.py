"""The experiment kit: presets routed by the CLI, the fingerprint guard (refusal and
retrain) in the kit and in the generic training job, the JSON encoder, seed aggregation,
the claims table, run-folder reruns, and SIGTERM marking a run interrupted."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mechinterp import cli
from mechinterp.experiments import kit
from mechinterp.train import fingerprint as fp
from mechinterp.train.checkpoint import Checkpointer
from test_train_support import ToyLM, token_rows, toy_train_config

# --------------------------------------------------------------------------- presets

CONFIG = '''
import ml_collections
from mechinterp.experiments import kit

PRESETS = {{"default": {{}}, "smoke": {{"steps": 2, "model.width": 4}}}}


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    kit.common(c, job="test_experiment_kit:record_job", workdir={workdir!r})
    c.steps = 100
    c.model = ml_collections.ConfigDict({{"width": 64}})
    return kit.with_preset(c, PRESETS, arg)
'''

SEEN = {}


@kit.job
def record_job(config, workdir):
    SEEN["config"] = config
    with kit.Run(config, workdir) as run:
        run.write_results({"steps": config.steps})
        run.write_report("# ok")


def test_preset_is_routed_to_get_config_before_overrides(config_file, tmp_path):
    assert cli.main(["run", str(config_file), "model.width=8", "preset=smoke"]) == 0
    config = SEEN["config"]
    assert (config.preset, config.steps, config.model.width) == ("smoke", 2, 8)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["preset"] == "smoke" and written["steps"] == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    assert cli.main(["run", str(config_file), f"workdir={tmp_path / 'd'}"]) == 0
    assert (SEEN["config"].preset, SEEN["config"].steps) == ("default", 100)


def test_unknown_preset_is_an_error_listing_the_known_ones(config_file):
    with pytest.raises(kit.UnknownPreset, match="unknown preset 'smok'; known presets: "
                                                "default, smoke"):
        cli.main(["run", str(config_file), "preset=smok"])
    config = ml_collections.ConfigDict({"a": 1, "preset": "default"})
    with pytest.raises(KeyError, match="'b'"):  # a preset naming a missing key
        kit.with_preset(config, {"x": {"b": 2}}, "x")


def test_rerun_with_other_settings_is_refused_unless_overwrite(config_file, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["run", str(config_file)]) == 0
    assert cli.main(["run", str(config_file), "progress=False"]) == 0  # ignored key
    with pytest.raises(kit.RunFolderMismatch, match=r"steps: 100 -> 7.*overwrite=True"):
        cli.main(["run", str(config_file), "steps=7"])
    assert json.loads((run / "results.json").read_text())["steps"] == 100  # untouched
    assert cli.main(["run", str(config_file), "steps=7", "overwrite=True"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 7
    kept = json.loads((run / "previous" / "0" / "results.json").read_text())
    assert kept["steps"] == 100


def test_a_folder_in_use_by_a_live_job_is_refused(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0})
    kit.write_json(tmp_path / "run.json", {"status": "running", "pid": os.getppid()})
    with pytest.raises(kit.RunFolderMismatch, match="in use by a running job"):
        with kit.Run(config, tmp_path):
            pass
    kit.write_json(tmp_path / "run.json", {"status": "running", "pid": 2 ** 22 + 12345})
    with kit.Run(config, tmp_path):  # a dead pid: an interrupted run, continue
        pass


# --------------------------------------------------------------------------- JSON, report


@dataclasses.dataclass
class Point:
    x: float
    where: Path


def test_json_encoder_handles_numpy_jax_dataclasses_and_paths():
    obj = {"f": np.float32(0.5), "i": np.int64(3), "a": np.arange(3),
           "j": jnp.ones((2,)), "js": jnp.float32(2.0), "d": Point(1.5, Path("/x/y")),
           "t": (1, 2), "s": {"b", "a"}}
    assert json.loads(kit.jsonio.dumps(obj)) == {
        "f": 0.5, "i": 3, "a": [0, 1, 2], "j": [1.0, 1.0], "js": 2.0,
        "d": {"x": 1.5, "where": "/x/y"}, "t": [1, 2], "s": ["a", "b"]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        kit.jsonio.dumps({"o": object()})


def test_claims_table_renders_the_three_columns():
    lines = kit.claims_table([
        kit.Claim("ablating recall circuits cuts recall", "-0.31 ± 0.05 (3 seeds)", True),
        kit.Claim("neuron level weaker", "0.1 | 0.2", False, "mean over methods"),
        kit.Claim("transfer 0.64", "n/a", None)])
    assert lines[0] == "| paper's claim | ours | reproduced? |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| ablating recall circuits cuts recall | -0.31 ± 0.05 (3 seeds) | yes |"
    assert lines[3] == "| neuron level weaker | 0.1 \\| 0.2 | no (mean over methods) |"
    assert lines[4] == "| transfer 0.64 | n/a | not tested |"


# --------------------------------------------------------------------------- seeds


def test_seeds_aggregate_into_mean_std_and_values():
    config = ml_collections.ConfigDict({"seed": 4, "seeds": 3})
    assert kit.train_seeds(config) == [4, 5, 6]
    per_seed = [{"acc": 0.8, "rows": [{"name": "a", "d": 1.0}], "family": "llama"},
                {"acc": 0.9, "rows": [{"name": "a", "d": 2.0}], "family": "llama"},
                {"acc": 0.85, "rows": [{"name": "a", "d": 3.0}], "family": "llama"}]
    agg = kit.aggregate(per_seed)
    assert agg["acc"]["mean"] == pytest.approx(0.85)
    assert agg["acc"]["std"] == pytest.approx(0.05)  # sample sd (ddof=1)
    assert agg["acc"]["values"] == [0.8, 0.9, 0.85] and agg["acc"]["n"] == 3
    assert agg["rows"][0]["name"] == "a" and agg["rows"][0]["d"]["mean"] == 2.0
    assert agg["family"] == "llama"
    assert kit.pm(agg["acc"]) == "0.85 ± 0.05 (3 seeds)"
    assert kit.pm(kit.aggregate([0.5])) == "0.50"
    with pytest.raises(ValueError, match="different keys"):
        kit.aggregate([{"a": 1}, {"b": 1}])


# --------------------------------------------------------------------------- training


def _train_config(steps=4, seed=0):
    t = toy_train_config(steps, warmup_steps=1, checkpoint_every=2)
    t.seed = seed
    t.train.tensorboard = False
    t.train.async_checkpoints = False
    return t


def _source(n=32):
    return token_rows(n)


def test_train_or_reuse_reuses_and_refuses_a_checkpoint_of_other_settings(tmp_path):
    source = _source()
    first = kit.train_or_reuse(ToyLM(), source, _train_config(), tmp_path)
    assert not first.info["reused_checkpoint"] and first.info["step"] == 4
    again = kit.train_or_reuse(ToyLM(), source, _train_config(), tmp_path)
    assert again.info["reused_checkpoint"]
    np.testing.assert_array_equal(again.params["embedding"], first.params["embedding"])

    with pytest.raises(fp.FingerprintMismatch,
                       match=r"model\.d_model: 16 -> 8.*retrain=True"):
        kit.train_or_reuse(ToyLM(d_model=8), source, _train_config(), tmp_path)
    with pytest.raises(fp.FingerprintMismatch, match=r"train\.seed: 0 -> 1"):
        kit.train_or_reuse(ToyLM(), source, _train_config(seed=1), tmp_path)
    with pytest.raises(fp.FingerprintMismatch, match=r"data\.source\.sample_sha256"):
        kit.train_or_reuse(ToyLM(), _source(n=40)[8:], _train_config(), tmp_path)
    # logging / checkpoint cadence do not matter
    quiet = _train_config()
    quiet.train.log_every, quiet.train.checkpoint_every = 4, 4
    assert kit.train_or_reuse(ToyLM(), source, quiet, tmp_path).info["reused_checkpoint"]

    new = kit.train_or_reuse(ToyLM(d_model=8), source, _train_config(), tmp_path,
                             retrain=True)
    assert not new.info["reused_checkpoint"] and new.params["embedding"].shape[-1] == 8
    kept = tmp_path / "replaced-0"  # the old run is moved aside, never deleted
    assert Checkpointer(kept / "checkpoints").latest_step() == 4
    assert json.loads((kept / fp.FILE).read_text())["settings"]["model.d_model"] == 16


def test_a_checkpoint_without_fingerprint_is_refused(tmp_path):
    from mechinterp.train.loop import fit
    fit(_train_config(), tmp_path, ToyLM(), _source())
    with pytest.raises(fp.FingerprintMismatch, match="no fingerprint.json"):
        kit.train_or_reuse(ToyLM(), _source(), _train_config(), tmp_path)


def test_generic_training_job_is_guarded_by_the_same_fingerprint(tmp_path, monkeypatch):
    from mechinterp.train import loop
    config = _train_config(steps=2)
    config.model = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_mlp": 16}
    config.data.num_train, config.data.num_test = 64, 8
    config.data.eval_batch_size = 8
    config.data.seq_len = 12
    loop.run(config, tmp_path)
    assert (tmp_path / fp.FILE).exists()
    config.model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 16}
    with pytest.raises(fp.FingerprintMismatch, match=r"model\.config\.d_model: 16 -> 32"):
        loop.run(config, tmp_path)
    # the refused run leaves the finished run's config.json as it was
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 16
    # retrain=True (a key outside the training config) passes the guard; training itself
    # is stubbed: the kit's test above trains after a retrain
    config.retrain = True
    monkeypatch.setattr(loop, "fit", lambda *a, **k: loop.FitResult(None, 2, "done", {}, None))
    assert loop.run(config, tmp_path).step == 2
    assert (tmp_path / "replaced-0" / "checkpoints").is_dir()
    assert (tmp_path / "data").is_dir()  # the dataset is not training output: it stays
    saved = json.loads((tmp_path / fp.FILE).read_text())["settings"]
    assert saved["model.config.d_model"] == 32


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_during_training_saves_and_marks_the_run_interrupted(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0, "preset": "default"})

    def term_at_2(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(kit.Interrupted) as stopped:
        with kit.Run(config, tmp_path):
            kit.train_or_reuse(ToyLM(), _source(), _train_config(steps=6), tmp_path / "m",
                               on_step=term_at_2)
    assert stopped.value.code == kit.EXIT_INTERRUPTED != 0
    status = json.loads((tmp_path / "run.json").read_text())
    assert status["status"] == "interrupted" and "step 2" in status["error"]
    assert Checkpointer(tmp_path / "m" / "checkpoints").latest_step() == 2

    with kit.Run(config, tmp_path) as run:  # the same command again resumes and completes
        trained = kit.train_or_reuse(ToyLM(), _source(), _train_config(steps=6),
                                     tmp_path / "m")
        with run.phase("analysis"):
            pass
    assert trained.info["step"] == 6
    status = json.loads((tmp_path / "run.json").read_text())
    assert status["status"] == "complete" and "analysis" in status["timings_s"]


def test_sigterm_outside_training_stops_at_the_next_phase_boundary(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0})
    reached = []
    with pytest.raises(kit.Interrupted):
        with kit.Run(config, tmp_path) as run:
            with run.phase("one"):
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("one")  # the phase in progress finishes
            reached.append("two")
    assert reached == ["one"]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    with pytest.raises(RuntimeError):
        with kit.Run(config, tmp_path):
            raise RuntimeError("boom")
    status = json.loads((tmp_path / "run.json").read_text())
    assert status["status"] == "failed" and "boom" in status["error"]


def test_run_writes_results_figures_and_report(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0, "preset": "smoke"})
    with kit.Run(config, tmp_path) as run:
        with run.phase("fit"):
            pass
        with run.figure("curve.png", 1, 2, figsize=(4, 2)) as (fig, axes):
            axes[0].plot([0, 1])
        run.write_results({"acc": np.float32(0.5)}, arrays={"grid": np.eye(2)})
        run.write_report(["# title", "", *kit.claims_table([kit.Claim("c", "o", True)])])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["acc"] == 0.5 and "fit" in results["timings_s"]
    np.testing.assert_array_equal(np.load(tmp_path / "results.npz")["grid"], np.eye(2))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| c | o | yes |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "run.json").read_text())["figures"] == ["curve.png"]


def test_a_fingerprint_without_a_checkpoint_guards_nothing(tmp_path):
    """A run that failed before its first checkpoint left only fingerprint.json (and maybe
    a metrics log): a run with other settings proceeds, and the old files move aside."""
    first = fp.fingerprint(model={"d_model": 16}, data={}, train={})
    assert fp.guard(tmp_path, first) == "new"
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    other = fp.fingerprint(model={"d_model": 8}, data={}, train={})
    assert fp.guard(tmp_path, other) == "retrained"
    kept = tmp_path / "replaced-0"
    assert json.loads((kept / fp.FILE).read_text())["hash"] == first["hash"]
    assert (kept / "metrics.jsonl").exists() and not (tmp_path / "metrics.jsonl").exists()
