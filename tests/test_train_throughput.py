"""Smoke test of benchmarks/train_throughput.py: a tiny decoder on CPU, in a subprocess."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~21 s of CPU time (import, two compiles); more on a shared machine
def test_tiny_cpu_run_reports_tokens_per_second_and_mfu(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--seq", "16", "--batch", "2",
         "--steps", "1", "--warmup", "1", "--peak-flops", "1e12", "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "x CPU" in run.stdout and "a smoke run" in run.stdout
    assert "| tiny | 0.14 | 2 | 16 | float32 |" in run.stdout

    (row,) = json.loads(out.read_text())["rows"]
    # tiny: vocab 256, d_model 64, 2 layers, 4 heads of 16, d_mlp 192, untied embeddings.
    # Parameters: embedding + lm_head 2 * 256 * 64, per layer q,k,v,o 4 * 64 * 64,
    # gate/up/down 3 * 64 * 192 and two norms 2 * 64, and the final norm 64.
    assert row["params"] == 2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 64
    # FLOPs per token: 6 N (N: the matmul weights, lm_head included, embedding lookup not)
    # + 12 * layers * heads * d_head * seq.
    matmul = 2 * (4 * 64 * 64 + 3 * 64 * 192) + 64 * 256
    assert row["flops_per_token"] == 6 * matmul + 12 * 2 * 4 * 16 * 16
    assert math.isclose(row["tokens_per_s"], 2 * 16 / row["step_s"])
    assert 0 < row["temp_bytes"] < 2**24  # a few MB of activations and scratch
    assert math.isclose(row["mfu"], row["tokens_per_s"] * row["flops_per_token"] / 1e12)
    assert abs(row["loss"] - math.log(256)) < 0.5  # a real next-token loss near chance


def test_mfu_is_not_available_without_a_peak():
    row = {"size": "tiny", "params": 1e5, "batch": 2, "seq": 16, "dtype": "float32",
           "step_s": 0.01, "tokens_per_s": 3200.0, "model_tflops_per_s": 0.002, "mfu": None,
           "temp_bytes": 3 * 2**29}
    bench = _load_benchmark()
    assert bench.format_table([row]).splitlines()[-1].endswith("| n/a | 1.5 |")
    assert "MFU n/a" in bench.device_line(None)
