"""One process of the multi-host sweep test (run by tests/test_sweep_multihost.py; no tests).

    python tests/sweep_multihost_worker.py OUT PROCESS_ID PORT

Joins a cluster of ``HOSTS`` JAX processes on ``localhost:PORT`` (CPU collectives over
gloo), each with ``DEVICES_PER_HOST`` CPU devices, and makes the same sweep call as every
other process with ``mesh={"data": -1}``: each process computes its own devices' cells.
Then process 1 asks for another grid than process 0, which both must refuse before any
compute. Process 0 writes the grid, the device counts and the refusal to ``OUT`` (.npz).
"""

import sys

import jax
import numpy as np

HOSTS, DEVICES_PER_HOST = 2, 2


def problem():
    """The model, params, a source cache, tokens and metric (the same everywhere; random
    sources, not captured: one compilation less per process)."""
    from mechinterp import metrics
    from mechinterp.models import Decoder, DecoderConfig
    from test_decoder import random_params

    model = Decoder(DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_mlp=16))
    rng = np.random.default_rng(1)
    clean, corrupt = (rng.integers(0, 32, (2, 6)).astype(np.int32) for _ in range(2))
    params = random_params(model, clean)
    cache = {site: rng.standard_normal((2, 2, 6, 16)).astype(np.float32)
             for site in ("resid_pre", "attn_out")}  # (layer, batch, pos, d_model)
    return model, params, cache, corrupt, metrics.logit_diff(
        np.array([1, 2]), np.array([3, 4]))


def main(out: str, process_id: int, port: int) -> None:
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_HOST)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=HOSTS, process_id=process_id)
    from mechinterp import patching

    model, params, cache, corrupt, metric = problem()  # reuse off: one compilation less
    grid = patching.get_act_patch_resid_pre(model, params, corrupt, cache, metric,
                                            progress=False, mesh={"data": -1},
                                            reuse=False)
    other = (patching.get_act_patch_resid_pre if process_id == 0
             else patching.get_act_patch_attn_out)
    try:
        other(model, params, corrupt, cache, metric, progress=False, mesh={"data": -1},
              reuse=False)
        refusal = ""
    except ValueError as error:
        refusal = str(error)
    if jax.process_index() == 0:
        np.savez(out, grid=np.asarray(grid), devices=jax.device_count(),
                 processes=jax.process_count(), cell_devices=grid.cost["devices"],
                 refusal=np.array(refusal))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:4]))
