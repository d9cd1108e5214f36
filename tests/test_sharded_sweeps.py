"""Sweeps, capture and ablation over a mesh of 8 fake CPU devices (conftest sets them up)
give the one-device values to 1e-6, with each device computing its share of the cells."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from mechinterp import ablation, capture, metrics, patching
from mechinterp.components import component
from mechinterp.models import Decoder, DecoderConfig, MoEDecoder
from mechinterp.sharding import make_mesh
from mechinterp.sweep_mesh import Placement
from test_decoder import random_params

DECODER = Decoder(DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4,
                                n_kv_heads=2, d_mlp=16))
MOE = MoEDecoder(DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                               n_kv_heads=1, d_mlp=16, n_experts=4, n_experts_per_tok=2,
                               d_expert=8, d_shared_expert=8))
RNG = np.random.default_rng(0)
CLEAN, CORRUPT = (RNG.integers(0, 32, (2, 8)).astype(np.int32) for _ in range(2))
METRIC = metrics.logit_diff(np.array([1, 2]), np.array([3, 4]))
CELLS = {"data": 8}  # cells 8 ways
TWO_D = {"data": 2, "fsdp": 2, "tensor": 2}  # cells 4 ways (data x fsdp), weights 2 ways more


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, model, sites in (("decoder", DECODER, ["resid_pre", "attn.z", "mlp.hidden"]),
                               ("moe", MOE, ["resid_pre", "attn.z"])):
        params = random_params(model, CLEAN)
        _, cache = capture(model, params, CLEAN, sites=sites)
        out[name] = model, params, cache
    return out


# (model, grid, reuse, mesh): reuse on and off, both meshes, decoder and MoE decoder (with
# its experts 4 ways); one compilation each, against one device with the same reuse.
CASES = [
    ("decoder", "resid_pre", None, CELLS),
    ("decoder", "attn_head_out_by_pos", False, TWO_D),
    ("decoder", "mlp_neuron", None, TWO_D),
    ("moe", "resid_pre", None, {"data": 2, "expert": 4}),
]


def test_grids_over_a_mesh_equal_one_device(models):
    for name, grid, reuse, mesh in CASES:
        model, params, cache = models[name]
        fn = getattr(patching, f"get_act_patch_{grid}")
        want = fn(model, params, CORRUPT, cache, METRIC, reuse=reuse, progress=False)
        got = fn(model, params, CORRUPT, cache, METRIC, reuse=reuse, progress=False,
                 mesh=mesh)
        case = f"{name} {grid} reuse={reuse} mesh={mesh}"
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6,
                                   err_msg=case)
        ways = Placement(mesh).ways
        assert got.cost["devices"] == ways and want.cost["devices"] == 1
        # Each device's partitioned program (XLA's FLOP count) runs its share of the
        # cells: 1/ways of them, plus padding to a multiple of ways, with the weights
        # sharded further on the 2-D mesh (tensor or expert axes).
        cells = np.asarray(got).size
        share = -(-cells // ways) / cells
        assert got.cost["device_flops"] <= 1.2 * share * want.cost["device_flops"], case
        if ways == 8:
            assert got.cost["device_flops"] >= 0.8 * share * want.cost["device_flops"], case


def test_placement_splits_cells_and_shards_params_by_the_rules(models):
    model, params, _ = models["decoder"]
    place = Placement(TWO_D)
    chunk = place.cells(np.zeros((8, 2), np.int32))
    assert chunk.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in chunk.addressable_shards} == {(2, 2)}  # 8 cells / 4
    placed = place.params(model, params, (CLEAN,))
    wq = placed["layers"]["attn"]["wq"]  # (layer, embed, heads, head_dim)
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 8, 2, 4)}
    # an array on the same devices in another layout (a capture's cache) is resharded
    moved = place.put(chunk, place.replicated, "a cache")
    assert moved.sharding.is_fully_replicated and np.asarray(moved).shape == (8, 2)


def test_capture_and_ablation_over_a_mesh(models):
    model, params, want = models["decoder"]
    # batch 2 split over data (2 ways), weights over tensor; the fixture's one-device cache
    _, got = capture(model, params, CLEAN, sites=list(want), mesh={"data": 2, "tensor": 2,
                                                                    "expert": 2})
    for site in want:  # tensor-parallel sums add in another order: 1e-5 relative
        np.testing.assert_allclose(np.asarray(got[site]), np.asarray(want[site]), rtol=1e-5,
                                   atol=1e-6, err_msg=site)
    assert len(got["resid_pre"].sharding.device_set) == 8

    sets = [[component("attn.z", layer=layer, head=head)] for layer in range(2)
            for head in range(4)] + [[component("mlp.hidden", layer=1, d_mlp=3)]]
    one = ablation.sweep_component_sets(model, params, CORRUPT, sets, METRIC, progress=False)
    many = ablation.sweep_component_sets(model, params, CORRUPT, sets, METRIC,
                                         progress=False, mesh=CELLS)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-6)


def test_bad_meshes_and_operands_fail_before_compute(models):
    model, params, cache = models["decoder"]
    sweep = patching.get_act_patch_resid_pre
    run = lambda **kw: sweep(model, params, CORRUPT, cache, METRIC, progress=False, **kw)
    with pytest.raises(ValueError, match=r"unknown mesh axes \['rows'\]"):
        run(mesh={"rows": 8})
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        run(mesh={"data": 3})
    other = jax.make_mesh((8,), ("cells",), devices=jax.devices())
    with pytest.raises(ValueError, match=r"names mesh axes \['data', 'fsdp'\] that the mesh"):
        run(mesh=other)
    with pytest.raises(ValueError, match="rules= given without mesh="):
        run(rules=(("batch", "data"),))
    with pytest.raises(ValueError, match="'layers/attn/wk'.*4 ways"):  # 2 kv heads, 4 ways
        run(mesh={"data": 2, "tensor": 4})
    # A cache laid out over other devices than the sweep's mesh (half of them).
    half = make_mesh({"data": -1}, devices=jax.devices()[:4])
    elsewhere = dict(cache, resid_pre=jax.device_put(
        cache["resid_pre"], jax.sharding.NamedSharding(half, P())))
    with pytest.raises(ValueError, match=r"the source is sharded over devices \[0, 1, 2, 3\]"):
        sweep(model, params, CORRUPT, elsewhere, METRIC, progress=False, mesh=CELLS)
