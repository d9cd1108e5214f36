"""Expert parallelism on 8 fake CPU devices: MoE decoder weights sharded over the ``expert``
mesh axis by the rules in train/mesh.py give the single-device forward and train steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P
from mechinterp.models import DecoderConfig, MoEDecoder
from mechinterp.train.mesh import DEFAULT_RULES, make_mesh
from mechinterp.train.state import TrainState, abstract_train_state, shardings_of
from test_decoder import random_params
from test_train_step import SINGLE, TX, _assert_same, _train
from test_train_support import token_batch

EXPERT_PARALLEL = {"expert": 4, "data": 2}
CONFIG = DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                       d_mlp=16, n_experts=4, n_experts_per_tok=2, d_expert=8,
                       d_shared_expert=8, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)


MODEL = MoEDecoder(CONFIG)
BATCH = token_batch(batch=8, length=6)


@pytest.fixture(scope="module")
def random_weights():
    """Random parameters on one device (``moe_impl`` does not change the parameters).
    test_decoder's normal(0.15) weights: with normal(0.3) some gradients are so small that
    Adam lifts float noise in them past the parameter tolerance of ``_assert_same``."""
    return random_params(MODEL, BATCH["tokens"])


@pytest.fixture(scope="module")
def initial(random_weights):
    """A fresh train state as host arrays, without compiling the state's init (a MoE
    decoder's init takes as long to compile as a train step): the random parameters and
    the optimizer's initial state; the same state for both MoE implementations."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=random_weights,
                       opt_state=TX.init(random_weights),
                       rng=jax.random.PRNGKey(0))
    return jax.device_get(state)


def test_expert_weights_are_sharded_and_the_forward_matches(random_weights):
    mesh = make_mesh(EXPERT_PARALLEL)
    shardings = shardings_of(abstract_train_state(MODEL, TX, (BATCH["tokens"],), mesh=mesh,
                                                  rules=DEFAULT_RULES))
    single = random_weights
    params = jax.device_put(single, shardings.params)
    gate = params["layers"]["moe"]["gate"]
    assert gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {(2, 1, 16, 8)}
    assert params["layers"]["moe"]["router"].sharding.spec == P(None, "fsdp", "expert")

    want = jax.jit(MODEL.apply)({"params": single}, BATCH["tokens"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        got = jax.jit(MODEL.apply)({"params": params}, BATCH["tokens"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_expert_parallel_train_steps_match_one_device(impl, initial):
    model = MoEDecoder(dataclasses.replace(CONFIG, moe_impl=impl))
    single = _train(model, BATCH, SINGLE, initial, steps=2)
    sharded = _train(model, BATCH, EXPERT_PARALLEL, initial, steps=2)
    _assert_same(single, sharded)
    down = sharded[0].params["layers"]["moe"]["down"]
    assert down.sharding.spec == P(None, "expert", "tensor", "fsdp")
