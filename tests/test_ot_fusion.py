"""OT fusion (train/ot_fusion.py): a neuron-permuted copy is recovered exactly by the exact
solver, on the decoder and the ViT; vanilla averaging of the same pair is not the parent."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechinterp.models.decoder import Decoder, DecoderConfig
from mechinterp.models.vit import ViT
from mechinterp.train import ot_fusion


def _perm(rng, n):
    return np.eye(n)[rng.permutation(n)]


def permutation_maps(rng, n_layers, d, h, dh, d_mlp, rope):
    """Maps of a random neuron permutation: one residual permutation, heads moved as
    wholes with within-head permutations (none for Q/K under RoPE), MLP neurons."""
    res = _perm(rng, d)
    maps = {("res", k): res for k in range(n_layers + 1)}
    for l in range(n_layers):
        heads = _perm(rng, h)
        qk = np.kron(heads, np.eye(dh) if rope else _perm(rng, dh))
        maps.update({("qk", l): qk, ("v", l): np.kron(heads, _perm(rng, dh)),
                     ("hid", l): _perm(rng, d_mlp), ("mid", l): res,
                     ("attn_out", l): res, ("mlp_out", l): res})
    return maps


def _tree_max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


CASES = {
    "decoder": (Decoder(DecoderConfig(vocab_size=19, d_model=16, n_layers=2, n_heads=4,
                                      n_kv_heads=4, d_mlp=24, qkv_bias=True)),
                lambda r: (jnp.asarray(r.integers(0, 19, (6, 10))),), 16, 4, 4, 24, True),
    "vit": (ViT(image_size=8, patch_size=2, d_model=16, n_layers=2, n_heads=4, d_mlp=24),
            lambda r: (jnp.asarray(r.normal(size=(8, 8, 8, 1)), jnp.float32),),
            16, 4, 4, 24, False),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_fusing_a_permuted_copy_recovers_it_exactly(family):
    model, inputs_of, d, h, dh, d_mlp, rope = CASES[family]
    rng = np.random.default_rng(0)
    inputs = inputs_of(rng)
    # random parameters (no constant biases or norm scales: every unit distinguishable),
    # without compiling the initializers
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(1), *inputs)["params"])
    params_a = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                            shapes)
    layout, _ = ot_fusion.layout_of(model)
    maps = permutation_maps(rng, 2, d, h, dh, d_mlp, rope)
    params_b = ot_fusion.align(params_a, maps, layout, 2)
    apply = jax.jit(model.apply)
    out_a = apply({"params": params_a}, *inputs)
    out_b = apply({"params": params_b}, *inputs)
    np.testing.assert_allclose(out_b, out_a, atol=1e-4)   # the same function
    assert _tree_max_diff(params_a, params_b) > 0.1        # in another basis

    fused = ot_fusion.ot_fuse(model, params_a, params_b, inputs, solver="exact")
    assert _tree_max_diff(fused, params_b) < 1e-5
    vanilla = ot_fusion.average(params_a, params_b)
    out_v = apply({"params": vanilla}, *inputs)
    assert float(jnp.abs(out_v - out_a).max()) > 1e-2     # plain averaging is not the parent


def test_sinkhorn_plan_has_uniform_marginals_and_bad_widths_are_refused():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 30))
    t = ot_fusion.plan(x, x[::-1] + 0.01 * rng.normal(size=x.shape), "sinkhorn", 0.01)
    np.testing.assert_allclose(t.sum(0), 0.2, atol=1e-4)
    np.testing.assert_allclose(t.sum(1), 0.2, atol=1e-4)
    assert (t.argmax(1) == np.arange(5)[::-1]).all()
    with pytest.raises(ValueError, match="equal widths"):
        ot_fusion.plan(x, x[:4], "exact")
    with pytest.raises(ValueError, match="solver"):
        ot_fusion.plan(x, x, "hungarian")


def test_ot_fusion_smoke_run_reports_every_model_before_and_after_fine_tuning(smoke_run):
    import json

    workdir = smoke_run("ot_fusion")
    results = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    for family in ("vit",):
        s = results[family]["summary"]
        assert set(s["one_shot"]) == {"parent_a", "parent_b", "vanilla", "ot_exact",
                                      "ot_sinkhorn"}
        assert set(s["finetuned"]) == {"parent_b", "vanilla", "ot_exact", "ot_sinkhorn"}
        for stage in s.values():
            for m in stage.values():
                assert 0 <= m["accuracy"]["mean"] <= 1 and np.isfinite(m["loss"]["mean"])
        assert f"{family}: one-shot OT fusion beats vanilla" in report
