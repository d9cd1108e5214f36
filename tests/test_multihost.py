"""Two JAX processes on CPU (gloo collectives), each loading its own shard of every batch,
train exactly like one process over the same devices (see tests/multihost_worker.py)."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(*args, worker=WORKER):
    return subprocess.Popen([sys.executable, str(worker), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(workers) -> None:
    """Wait for every worker (killed after 600 s); each must exit 0."""
    try:
        logs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]


@pytest.mark.slow  # three fresh JAX processes (~25 s of CPU time each, mostly import+compile)
def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    workers = [_start(tmp_path / "multi.npz", "multi", i, port) for i in range(2)]
    workers.append(_start(tmp_path / "single.npz", "single"))
    _wait(workers)

    multi, single = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert (int(multi["processes"]), int(multi["devices"])) == (2, 4)
    assert (int(single["processes"]), int(single["devices"])) == (1, 4)
    assert (int(multi["local_rows"]), int(single["local_rows"])) == (4, 8)  # per host
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-6)
    assert multi["losses"][-1] < multi["losses"][0]
    names = [k for k in single.files if k.startswith("[")]
    assert names  # parameter arrays, keyed by path
    for name in names:
        np.testing.assert_allclose(multi[name], single[name], atol=1e-6, err_msg=name)
