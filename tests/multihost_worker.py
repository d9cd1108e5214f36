"""One process of the multi-host training test (run by tests/test_multihost.py; no tests).

    python tests/multihost_worker.py OUT multi PROCESS_ID PORT   # one of HOSTS processes
    python tests/multihost_worker.py OUT single                  # the reference

``multi``: joins a cluster of ``HOSTS`` JAX processes on ``localhost:PORT`` (CPU
collectives over gloo), each with ``DEVICES_PER_HOST`` CPU devices, and loads only its own
shard of every batch (grain ``ShardByJaxProcess``), as a multi-host run does. ``single``:
one process with all ``HOSTS * DEVICES_PER_HOST`` devices that reads every host's shard
itself and puts them together in process order (what ``global_batch`` assembles across
hosts). Either way it trains ``STEPS`` steps of a small language model with the library's
train step on a mesh with data and fsdp axes; process 0 writes the losses, the final
parameters and the number of batch rows it loaded per step to ``OUT`` (``.npz``).
"""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from mechinterp.train.data import batches, shard_options
from mechinterp.train.mesh import DEFAULT_RULES, global_batch, make_mesh
from mechinterp.train.optim import make_optimizer
from mechinterp.train.state import abstract_train_state, init_train_state, shardings_of
from mechinterp.train.step import make_train_step
from test_train_support import ToyLM, token_batch

HOSTS, DEVICES_PER_HOST, STEPS, BATCH = 2, 2, 4, 8


def start(mode: str, process_id: int, port: int) -> list:
    """Set up devices (and the cluster); this process's batch iterators."""
    rows = token_batch(batch=48, seed=3)
    source = [{k: v[i] for k, v in rows.items()} for i in range(48)]
    if mode == "multi":
        jax.config.update("jax_num_cpu_devices", DEVICES_PER_HOST)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=HOSTS, process_id=process_id)
        return [batches(source, batch_size=BATCH, seed=0)]  # this host's shard only
    jax.config.update("jax_num_cpu_devices", HOSTS * DEVICES_PER_HOST)
    return [batches(source, batch_size=BATCH, seed=0, shard=shard_options(h, HOSTS))
            for h in range(HOSTS)]


def train(iterators: list) -> tuple[list[float], dict, int]:
    mesh = make_mesh({"data": 2, "fsdp": -1})
    model, tx = ToyLM(), make_optimizer("adamw", 1e-2, clip_norm=1.0)
    inputs = (jax.ShapeDtypeStruct((BATCH, 12), np.int32),)
    abstract = abstract_train_state(model, tx, inputs, mesh=mesh, rules=DEFAULT_RULES)
    state = init_train_state(model, tx, inputs, mesh=mesh, rules=DEFAULT_RULES)
    step = make_train_step(model, tx, shardings_of(abstract), mesh=mesh, rules=DEFAULT_RULES)
    losses = []
    for _ in range(STEPS):
        parts = [next(it) for it in iterators]
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = step(state, global_batch(local, mesh, DEFAULT_RULES))
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    return losses, params, len(local["tokens"])


def main(out: str, mode: str, process_id: int = 0, port: int = 0) -> None:
    losses, params, local_rows = train(start(mode, process_id, port))
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out, losses=np.asarray(losses), devices=jax.device_count(),
                 processes=jax.process_count(), local_rows=local_rows, **flat)
    if mode == "multi":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5]))
