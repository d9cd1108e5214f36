"""TensorBoard scalars from the training loop equal its JSONL metrics."""

import json
import struct

import numpy as np
import pytest
from mechinterp.train.config import default_config
from mechinterp.train.digits import build_digits
from mechinterp.train.loop import _Loop, fit
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c
from test_train_support import ToyClassifier


def read_events(folder):
    """Every event of the TFRecord files in ``folder``: 8-byte little-endian length, its
    masked CRC-32C, the serialized ``Event``, its masked CRC-32C."""
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
            record = data[offset + 12:offset + 12 + length]
            (crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
            assert crc == masked_crc32c(record)
            events.append(Event.FromString(record))
            offset += 16 + length
    return events


def _config(steps):
    config = default_config()
    config.mesh = {"data": 8}
    config.train.objective = "classification"
    config.data.batch_size = 32
    config.data.eval_batch_size = 64
    config.optimizer.learning_rate = 2e-2
    config.schedule.warmup_steps = 5
    config.train.steps = steps
    config.train.log_every = 10
    config.train.eval_every = 20
    config.train.checkpoint_every = 20
    config.train.progress = False
    return config


def scalars(folder):
    """``{(tag, step): value}`` as TensorBoard shows it: files in the order written, and a
    ``SessionLog.START`` at step ``s`` (a writer's ``purge_step``) drops what earlier
    events logged at steps >= ``s``."""
    logged = {}
    for event in read_events(folder):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            logged = {key: v for key, v in logged.items() if key[1] < event.step}
        for value in event.summary.value:
            logged[value.tag, event.step] = value.simple_value
    return logged


class Crash(RuntimeError):
    pass


@pytest.mark.slow  # two fits (~15 s of CPU time); 38 s measured on the shared 2 cores
def test_tensorboard_scalars_equal_the_jsonl_metrics_across_a_resume(tmp_path):
    digits = build_digits(data_dir=tmp_path / "data")
    model = ToyClassifier(features=64, hidden=32, classes=10)
    train, test = digits.as_data_source("train"), digits.as_data_source("test")

    def crash_after_logging_step_30(step, state):
        if step == 31:
            raise Crash

    with pytest.raises(Crash):  # step 30 is logged, the last checkpoint is step 20
        fit(_config(40), tmp_path / "run", model, train, test,
            on_step=crash_after_logging_step_30)
    resumed = _config(40)
    resumed.train.log_every = 20  # so the crashed run's step 30 must disappear
    result = fit(resumed, tmp_path / "run", model, train, test)  # resumes at step 20
    assert result.eval["accuracy"] > 0.8  # a tiny MLP learns digits (0.87 measured)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 10), ("train", 20), ("eval", 20), ("train", 40), ("eval", 40)]
    expected = {(f"{r['kind']}/{name}", r["step"]): value for r in records
                for name, value in r.items() if name not in ("kind", "step")}
    assert {"train/loss", "train/grad_norm", "train/lr", "eval/accuracy"} <= {
        tag for tag, _ in expected}

    folder = tmp_path / "run" / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one per run
    assert ("train/loss", 30) in {(v.tag, e.step) for e in read_events(folder)
                                  for v in e.summary.value}  # written by the crashed run
    logged = scalars(folder)
    assert logged.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard stores float32
        assert logged[key] == np.float32(value), key


def test_tensorboard_can_be_switched_off(tmp_path):
    for switch in (True, False):
        config = default_config()
        config.train.tensorboard = switch
        (tmp_path / str(switch)).mkdir()
        loop = _Loop(config, tmp_path / str(switch), 0, checkpointer=None,
                     tokens_per_example=None, flops_per_token=None)
        with loop.log:
            loop.log.write("train", 1, {"loss": 0.5})
        assert (tmp_path / str(switch) / "tensorboard").exists() == switch
        assert json.loads((tmp_path / str(switch) / "metrics.jsonl").read_text())["loss"] == 0.5
