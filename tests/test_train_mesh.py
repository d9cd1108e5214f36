"""Mesh building, logical-axis rules and their errors (8 fake CPU devices, no compiling)."""

import jax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mechinterp.models import Decoder, DecoderConfig
from mechinterp.train import mesh as M
from mechinterp.train.optim import make_optimizer
from mechinterp.train.state import abstract_train_state
from test_train_support import ToyLM, token_batch


def test_mesh_axes_sizes_and_auto_axis_types():
    mesh = M.make_mesh({"data": -1, "tensor": 2})
    assert mesh.axis_names == M.MESH_AXES
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    assert set(mesh.axis_types) == {AxisType.Auto}
    assert dict(M.make_mesh().shape)["data"] == jax.device_count() == 8


@pytest.mark.parametrize("sizes, match", [
    ({"data": 3}, "does not divide the 8 devices"),
    ({"data": -1, "tensor": 3}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 2}, "use 2 of 8 devices"),
    ({"model": 2}, "unknown mesh axes"),
    ({"data": 0, "fsdp": -1}, "positive size"),
])
def test_bad_mesh_sizes_are_clear_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        M.make_mesh(sizes)


def test_rules_naming_unknown_mesh_axes_are_errors():
    mesh = M.make_mesh({"data": -1})
    with pytest.raises(ValueError, match=r"'mlp' -> 'model' names mesh axes \['model'\]"):
        M.check_rules(M.DEFAULT_RULES + (("mlp", "model"),), mesh)
    with pytest.raises(ValueError, match="must be a pair"):
        M.check_rules((("embed",),), mesh)


def test_logical_names_without_a_rule_are_errors_naming_the_parameter():
    mesh = M.make_mesh({"data": -1})
    rules = tuple(r for r in M.DEFAULT_RULES if r[0] != "mlp")
    tokens = token_batch()["tokens"]
    with pytest.raises(ValueError, match=r"parameter 'b_in' has logical axes \['mlp'\]"):
        abstract_train_state(ToyLM(), make_optimizer("sgd", 0.1), (tokens,), mesh=mesh,
                             rules=rules)


def test_sharded_dimension_that_does_not_divide_names_the_parameter():
    config = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_mlp=64)
    mesh = M.make_mesh({"tensor": 4, "data": -1})
    with pytest.raises(ValueError, match=r"'layers/attn/wk' of shape \(2, 32, 2, 8\) is "
                                         r"sharded over mesh axes 'tensor' \(4 ways\)"):
        abstract_train_state(Decoder(config), make_optimizer("sgd", 0.1),
                             (token_batch()["tokens"],), mesh=mesh, rules=M.DEFAULT_RULES)


def test_batch_size_must_divide_over_the_batch_axes():
    mesh = M.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    M.check_batch_size(8, mesh, M.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by 4"):
        M.check_batch_size(6, mesh, M.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"8 = 4 .* x 2 \(gradient accumulation"):
        M.check_batch_size(12, mesh, M.DEFAULT_RULES, grad_accum=2)
    assert M.batch_sharding(mesh, M.DEFAULT_RULES).spec == P(("data", "fsdp"))


def test_global_batch_is_split_over_the_batch_axes():
    mesh = M.make_mesh({"data": 4, "tensor": 2})
    batch = M.global_batch(token_batch(batch=8), mesh, M.DEFAULT_RULES)
    tokens = batch["tokens"]
    assert tokens.shape == (8, 12)
    assert {s.data.shape for s in tokens.addressable_shards} == {(2, 12)}
