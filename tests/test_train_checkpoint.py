"""Orbax checkpoints: resharding restore, iterator position, interrupted saves, keep-N,
wrong-model errors and the SIGTERM flag. (Exact resume of a whole run: test_train_loop.)"""

import os
import shutil
import signal

import jax
import numpy as np
import pytest

from mechinterp.train.checkpoint import COMMIT_FILE, Checkpointer, StopSignal
from mechinterp.train.data import batches, shard_options
from mechinterp.train.mesh import DEFAULT_RULES, make_mesh
from mechinterp.train.optim import make_optimizer
from mechinterp.train.state import abstract_train_state, init_train_state
from test_train_support import ToyLM, token_batch

TX = make_optimizer("adamw", 1e-2)
TOKENS = (token_batch()["tokens"],)


def _abstract(sizes, model=ToyLM(), tx=TX):
    return abstract_train_state(model, tx, TOKENS, mesh=make_mesh(sizes), rules=DEFAULT_RULES)


@pytest.fixture(scope="module")
def state():
    return init_train_state(ToyLM(), TX, TOKENS, mesh=make_mesh({"data": 8}),
                            rules=DEFAULT_RULES)


def _source(n=40):
    return [{"x": np.full((3,), i, np.int32)} for i in range(n)]


def _iterator():
    return batches(_source(), batch_size=4, seed=1, shard=shard_options(0, 1))


def test_restore_into_other_shardings_with_the_data_position(tmp_path, state):
    iterator = _iterator()
    seen = [next(iterator)["x"] for _ in range(3)]
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.save(3, state, iterator)
    expected_next = next(iterator)["x"]

    target = _abstract({"fsdp": 2, "tensor": 4})
    fresh = _iterator()
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 3
        restored = checkpointer.restore(target, fresh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    def shard_shapes(x):
        return {s.data.shape for s in x.addressable_shards}

    assert shard_shapes(state.params["w_in"]) == {(16, 32)}  # saved data-parallel
    assert shard_shapes(restored.params["w_in"]) == {(8, 8)}  # restored fsdp x tensor
    assert restored.params["w_in"].sharding.mesh.shape["tensor"] == 4
    np.testing.assert_array_equal(next(fresh)["x"], expected_next)
    assert not any(np.array_equal(expected_next, s) for s in seen)


def test_interrupted_save_leaves_the_previous_checkpoint_restorable(tmp_path, state):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(2, state.replace(step=state.step + 2))
    # Simulate saves cut off midway: a step folder never committed (its files truncated)
    # and an Orbax temporary folder.
    shutil.copytree(tmp_path / "2", tmp_path / "3")
    os.remove(tmp_path / "3" / COMMIT_FILE)
    for path in (tmp_path / "3").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp-1700000000")

    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.all_steps() == [1, 2]
        assert not (tmp_path / "3").exists()
        restored = checkpointer.restore(_abstract({"data": 8}))
        assert int(restored.step) == 2
        checkpointer.save(3, restored)  # the interrupted step can be saved again
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 3


def test_restoring_into_a_different_model_names_the_parameter(tmp_path, state):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state)
    with Checkpointer(tmp_path) as checkpointer:
        wider = _abstract({"data": 8}, model=ToyLM(d_mlp=48))
        with pytest.raises(ValueError, match=r"'params/w_in' has shape \(16, 32\) in the "
                                             r"checkpoint but \(16, 48\) in this model"):
            checkpointer.restore(wider)
        other_optimizer = _abstract({"data": 8}, tx=make_optimizer("sgd", 0.1))
        with pytest.raises(ValueError, match=r"'opt_state/0/mu/b_in' is in the checkpoint but "
                                             r"not in this model"):
            checkpointer.restore(other_optimizer)
        with pytest.raises(ValueError, match="has no data-iterator state"):
            checkpointer.restore(_abstract({"data": 8}), _iterator())
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .* have \[1\]"):
            checkpointer.restore(_abstract({"data": 8}), step=7)
    with Checkpointer(tmp_path / "empty") as checkpointer:
        with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
            checkpointer.restore(_abstract({"data": 8}))


def test_keep_n_and_save_interval(tmp_path, state):
    with Checkpointer(tmp_path, keep=2, every=2) as checkpointer:
        saved = [checkpointer.save(step, state) for step in range(1, 7)]
        assert saved == [False, True, False, True, False, True]
        checkpointer.wait()
        assert checkpointer.all_steps() == [4, 6]
        assert checkpointer.save(7, state, force=True)
        checkpointer.wait()
        assert checkpointer.all_steps() == [6, 7]


def test_sigterm_is_recorded_while_active():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is previous
