"""The SegFormer family: efficient attention with reduction ratio 1 against plain softmax
attention in float64, the all-MLP decoder against a numpy reference, a sweep against a loop
of single interventions, the site table in docs/sites.md, bad inputs; the synthetic
segmentation data; mIoU and HCL against references."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import jaccard_score

import mechinterp
from mechinterp import Intervention
from mechinterp.experiments.kit.segmentation import mean_iou
from mechinterp.experiments.transkd.distill import hcl
from mechinterp.models.segformer import SegConfig, SegFormer, SRAttention
from mechinterp.sweep import sweep
from mechinterp.train.seg_shapes import build_seg_shapes, load_arrays, render_scene
from random_params import random_variables

TINY = SegConfig(dims=(8, 12), depths=(2, 1), heads=(2, 3), sr_ratios=(2, 1), strides=(4, 2),
                 d_decoder=6, n_classes=3, image_size=16)


@pytest.fixture(scope="module")
def tiny():
    model = SegFormer(TINY)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    return model, random_variables(model, images)["params"], images


def test_reduction_ratio_one_is_plain_attention_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 6))
    attn = SRAttention(n_heads=2, sr_ratio=1, side=3, prefix="")
    shapes = jax.eval_shape(attn.init, jax.random.key(0), jnp.asarray(x, jnp.float32))
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                          nn.meta.unbox(shapes["params"]))
    out = jax.jit(attn.apply)({"params": params}, jnp.asarray(x, jnp.float32))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    q, k, v = (np.einsum("bte,ehd->bthd", x, p[w]) + p[b]
               for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(3)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bthd,hde->bte", np.einsum("bhts,bshd->bthd", probs, v),
                         p["wo"]) + p["bo"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    reduced = SRAttention(n_heads=2, sr_ratio=3, side=3, prefix="")
    assert jax.eval_shape(lambda v: reduced.apply(reduced.init(jax.random.key(1), v), v),
                          jnp.asarray(x, jnp.float32)).shape == x.shape


def _bilinear(x, side):
    """Half-pixel-centre bilinear upsampling with clamped edges, in float64 numpy."""
    src = np.clip((np.arange(side) + 0.5) * x.shape[1] / side - 0.5, 0, x.shape[1] - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, x.shape[1] - 1)
    w = src - lo
    rows = x[:, lo] * (1 - w)[None, :, None, None] + x[:, hi] * w[None, :, None, None]
    return rows[:, :, lo] * (1 - w)[None, None, :, None] + rows[:, :, hi] * w[None, None, :, None]


def test_decoder_matches_numpy_reference(tiny):
    model, params, images = tiny
    names = ["s1.features", "s2.features", "dec.s2", "dec.fused"]
    logits, cache = mechinterp.capture(model, params, images, sites=names)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    projected = []
    for i in (1, 2):
        d = p[f"dec_linear_s{i}"]
        projected.append(_bilinear(np.asarray(cache[f"s{i}.features"], np.float64) @ d["kernel"]
                                   + d["bias"], 4))
    np.testing.assert_allclose(cache["dec.s2"], projected[1], atol=1e-5)
    fused = np.maximum(np.concatenate(projected[::-1], -1) @ p["dec_fuse"]["kernel"]
                       + p["dec_fuse"]["bias"], 0)
    np.testing.assert_allclose(cache["dec.fused"], fused, atol=1e-5)
    expected = _bilinear(fused @ p["dec_classify"]["kernel"] + p["dec_classify"]["bias"], 16)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert logits.shape == (2, 16, 16, 3)


def test_head_ablation_sweep_matches_loop(tiny):
    model, params, images = tiny
    info = mechinterp.list_sites(model, images)["s1.attn.z"]
    assert info.shape[:1] == (2,) and info.axes[0] == "layer"  # two unrolled blocks, stacked

    def metric(logits):
        return jax.nn.log_softmax(logits)[..., 1].mean()

    grid = sweep(model, params, (images,), "s1.attn.z", ("layer", "head"),
                 jnp.zeros(info.shape), metric,
                 make_intervention=lambda src, mask: Intervention.zero(mask), progress=False)
    assert grid.shape == (2, 2)
    for layer in range(2):
        for head in range(2):
            mask = np.zeros((2, 1, 1, 2, 1), np.float32)
            mask[layer, :, :, head] = 1
            logits = mechinterp.intervene(model, params, images, interventions={
                "s1.attn.z": Intervention.zero(jnp.asarray(mask))})
            np.testing.assert_allclose(grid.values[layer, head], metric(logits), atol=1e-5)
    clean = metric(model.apply({"params": params}, images))
    assert np.abs(grid.values - clean).max() > 1e-5


def test_site_table_in_docs_matches_declarations():
    text = (Path(__file__).resolve().parents[1] / "docs" / "sites.md").read_text()
    section = text.split("## SegFormer", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    documented = {n: (a.strip(), m.strip()) for n, a, m in rows}
    assert documented == {n: (", ".join(s.axes), s.meaning) for n, s in SegFormer.SITES.items()}


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match=r"takes images \(batch, 16, 16, 3\)"):
        SegFormer(TINY).init(jax.random.key(0), jnp.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="divisible by heads"):
        SegFormer(SegConfig(dims=(8, 10), depths=(1, 1), heads=(2, 4), sr_ratios=(1, 1),
                            strides=(4, 2), image_size=16))
    with pytest.raises(ValueError, match="one entry per stage"):
        SegFormer(SegConfig(dims=(8,), image_size=16))


def test_seg_shapes_are_seeded_labelled_and_have_domains(tmp_path):
    a = load_arrays(build_seg_shapes(data_dir=tmp_path / "a", size=16, n_train=6, n_test=2,
                                     seed=3), "train")
    b = load_arrays(build_seg_shapes(data_dir=tmp_path / "b", size=16, n_train=6, n_test=2,
                                     seed=3), "train")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (6, 16, 16, 3) and a[1].max() <= 6 and (a[1] > 0).any()
    image, mask = render_scene(24, np.random.default_rng(0), shapes=("disk",), n_objects=1)
    assert set(np.unique(mask)) == {0, 1}
    other, _ = render_scene(24, np.random.default_rng(0), shapes=("disk",), n_objects=1,
                            domain="striped")
    assert np.abs(image - other).mean() > 0.05
    with pytest.raises(ValueError, match="domain 'night'"):
        build_seg_shapes(data_dir=tmp_path, domain="night")


def test_mean_iou_matches_sklearn_and_hcl_matches_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 8, 8))
    pred = np.where(rng.uniform(size=target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    pred[pred == 3] = 2  # class 3 never predicted: IoU 0, still counted (it is in target)
    expected = jaccard_score(target.ravel(), pred.ravel(), average="macro")
    assert mean_iou(pred, target, 5) == pytest.approx(expected, abs=1e-12)  # class 4 absent
    fs, ft = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    pool = [fs.reshape(2, 2, 2, 2, 2, 3).mean((2, 4)), ft.reshape(2, 2, 2, 2, 2, 3).mean((2, 4))]
    ref = ((np.mean((fs - ft) ** 2) + 0.5 * np.mean((pool[0] - pool[1]) ** 2)
            + 0.25 * np.mean((fs.mean((1, 2)) - ft.mean((1, 2))) ** 2)) / 1.75)
    assert float(hcl([jnp.asarray(fs)], [jnp.asarray(ft)])) == pytest.approx(ref, rel=1e-5)


def test_glmixer_zero_weights_is_identity_and_distiller_reaches_teacher_channels():
    from mechinterp.experiments.transkd.distill import Distiller, GLMixer

    e = jax.random.normal(jax.random.key(0), (2, 2, 2, 4))
    mixer = GLMixer(n_heads=2)
    variables = random_variables(mixer, e)
    zeroed = {**variables["params"], "w_global": jnp.float32(0), "w_local": jnp.float32(0)}
    apply = jax.jit(mixer.apply)
    np.testing.assert_allclose(apply({"params": zeroed}, e), e)
    assert np.abs(np.asarray(apply(variables, e) - e)).max() > 1e-3
    teacher = SegConfig(dims=(10, 14), depths=(1, 1), heads=(2, 2), sr_ratios=(2, 1),
                        strides=(4, 2), image_size=16)
    images = jnp.zeros((2, 16, 16, 3))
    feats = [jnp.ones((2, 4, 4, 8)), jnp.ones((2, 2, 2, 12))]
    for embeds in ("glmixer", "ea"):  # shapes only: jax.eval_shape compiles nothing
        distiller = Distiller(TINY, teacher, "csf", embeds)
        f, out = jax.eval_shape(lambda: distiller.apply(
            distiller.init(jax.random.key(2), images, feats, feats), images, feats, feats))
        assert [a.shape for a in f] == [a.shape for a in out] == [(2, 4, 4, 10), (2, 2, 2, 14)]


def test_transkd_smoke_reports_miou_flops_and_claims(smoke_run):
    import json

    workdir = smoke_run("transkd")
    results = json.loads((workdir / "results.json").read_text())
    models = results["models"]
    assert list(models) == ["teacher", "plain", "ea"]
    for m in models.values():
        assert len(m["per_seed"]) == 2 and np.isfinite(m["final_loss"]).all()
        assert all(0 <= s["miou"] <= 1 for s in m["per_seed"])
        assert m["summary"]["miou"]["n"] == 2
    cost = results["cost"]
    assert 0 < cost["student"]["gflops"] < cost["teacher"]["gflops"]
    assert cost["flops_reduction"] == pytest.approx(
        1 - cost["student"]["gflops"] / cost["teacher"]["gflops"])
    claims = {c["claim"]: c["reproduced"] for c in results["claims"]}
    assert len(claims) == 6 and claims["EA helps"] is None  # Base not in the smoke preset
    report = (workdir / "report.md").read_text()
    assert "| TransKD-EA (Base + EA) | csf / ea |" in report
