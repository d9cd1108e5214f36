"""Two JAX processes on CPU (gloo), each computing its own devices' cells, give the grid of
one process on one device; processes asking for different grids are refused before compute
(see tests/sweep_multihost_worker.py)."""

from pathlib import Path

import numpy as np
import pytest
from mechinterp import patching
from sweep_multihost_worker import problem
from test_multihost import _free_port, _start, _wait

WORKER = Path(__file__).with_name("sweep_multihost_worker.py")


@pytest.mark.slow  # two fresh JAX processes (~19 s of CPU time in all, warm compile cache)
def test_two_processes_sweep_like_one(tmp_path):
    port, out = _free_port(), tmp_path / "multi.npz"
    workers = [_start(out, i, port, worker=WORKER) for i in range(2)]
    model, params, cache, corrupt, metric = problem()
    want = patching.get_act_patch_resid_pre(model, params, corrupt, cache, metric,
                                            progress=False, reuse=False)
    _wait(workers)
    multi = np.load(out)
    assert (int(multi["processes"]), int(multi["devices"]), int(multi["cell_devices"])) == (
        2, 4, 4)
    np.testing.assert_allclose(multi["grid"], np.asarray(want), atol=1e-6, rtol=1e-6)
    assert "processes [1] sweep a different grid than process 0" in str(multi["refusal"])
