"""Layered scenes and illustrations (train/layered_scenes.py) against a float64 per-pixel
reference, and the layered metrics against scikit-learn / SciPy / direct formulas."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import kendalltau
from sklearn.metrics import jaccard_score

from mechinterp.experiments.layered import metrics
from mechinterp.train import layered_scenes as ls


def reference_blend(mode, layer, base):
    """Scalar loops in float64: (1 - a) b + a B(b, f), with B written per channel."""
    out = np.empty(base.shape)
    for idx in np.ndindex(base.shape[:-1]):
        a = float(layer[idx][3])
        for c in range(3):
            b, f = float(base[idx][c]), float(layer[idx][c])
            mixed = {"normal": f, "multiply": b * f, "screen": b + f - b * f}[mode]
            out[idx][c] = (1 - a) * b + a * mixed
    return out


def random_layers(seed, n=3, size=5):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, size, size, 4)), rng.uniform(size=(size, size, 3))


@pytest.mark.parametrize("mode", ls.BLEND_MODES)
def test_blend_modes_match_the_float64_reference_in_numpy_and_jax(mode):
    layers, base = random_layers(0)
    want = reference_blend(mode, layers[0], base)
    np.testing.assert_allclose(ls.blend(mode, layers[0], base), want, atol=1e-12)
    got = ls.blend(mode, jnp.asarray(layers[0], jnp.float32), jnp.asarray(base, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_composite_stacks_bottom_to_top_and_order_matters():
    layers, base = random_layers(1)
    modes = ("normal", "multiply", "screen")
    want = base
    for layer, mode in zip(layers, modes):
        want = reference_blend(mode, layer, want)
    np.testing.assert_allclose(ls.composite(base, layers, modes), want, atol=1e-12)
    assert np.abs(ls.composite(base, layers[::-1], modes[::-1]) - want).max() > 1e-2
    with pytest.raises(ValueError, match="2 blend modes"):
        ls.composite(base, layers, modes[:2])
    with pytest.raises(ValueError, match="blend mode must be one of"):
        ls.blend("overlay", layers[0], base)


def test_merge_over_is_one_layer_equal_to_the_two():
    (top, bottom, _), base = random_layers(2)
    top[0, 0, 3] = bottom[0, 0, 3] = 0.0  # fully transparent pixel: no division by zero
    merged = ls.merge_over(top, bottom)
    want = reference_blend("normal", top, reference_blend("normal", bottom, base))
    np.testing.assert_allclose(ls.blend("normal", merged, base), want, atol=1e-12)
    got = ls.merge_over(jnp.asarray(top, jnp.float32), jnp.asarray(bottom, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), merged, atol=2e-6)


def test_scene_composite_and_effects():
    rng = np.random.default_rng(3)
    s = ls.scene(16, rng, n_foregrounds=2)
    want = ls.composite(s["background"].astype(np.float64), s["foregrounds"].astype(np.float64))
    np.testing.assert_allclose(s["inputs"], want, atol=1e-6)
    alpha = s["foregrounds"][..., 3]
    assert (alpha >= s["masks"] - 1e-6).all()  # the object is inside its layer
    assert (alpha[s["masks"] < 0.01] > 0.05).any()  # shadow / reflection beyond the object
    plain = ls.scene(16, np.random.default_rng(3), n_foregrounds=2, shadow=False,
                     reflection=False)
    np.testing.assert_allclose(plain["foregrounds"][..., 3], plain["masks"], atol=1e-6)


def test_illustration_recomposes_from_its_layers_in_its_order():
    il = ls.illustration(16, np.random.default_rng(4))
    order = il["order"]
    assert order[0] == 0 and sorted(order) == [0, 1, 2, 3]
    want = np.ones((16, 16, 3))
    for k in order:
        want = reference_blend(ls.ILLUSTRATION_MODES[k], il["layers"][k].astype(np.float64), want)
    np.testing.assert_allclose(il["inputs"], want, atol=1e-6)


def test_builders_are_tfds_datasets_and_deterministic(tmp_path):
    b = ls.build_scenes(data_dir=tmp_path, size=8, n_train=3, n_test=2, n_foregrounds=2)
    train = ls.arrays(b, "train")
    assert train["foregrounds"].shape == (3, 2, 8, 8, 4) and train["labels"].shape == (3, 2)
    again = ls.arrays(ls.build_scenes(data_dir=tmp_path / "b", size=8, n_train=3, n_test=2,
                                      n_foregrounds=2), "train")
    np.testing.assert_array_equal(train["inputs"], again["inputs"])
    il = ls.arrays(ls.build_illustrations(data_dir=tmp_path, size=8, n_train=2, n_test=1), "test")
    assert il["layers"].shape == (1, 4, 8, 8, 4) and il["order"].shape == (1, 4)
    with pytest.raises(ValueError, match="size >= 8"):
        ls.build_scenes(data_dir=tmp_path, size=4)


def test_psnr_and_alpha_iou_match_direct_formulas_and_sklearn():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(size=(4, 6, 6, 3)), rng.uniform(size=(4, 6, 6, 3))
    want = np.mean([10 * np.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(a, b)])
    assert metrics.psnr(a, b) == pytest.approx(want, rel=1e-12)
    assert metrics.psnr(a, a) == 100.0
    pa, ta = rng.uniform(size=(4, 6, 6)), rng.uniform(size=(4, 6, 6))
    want = np.mean([jaccard_score((t > 0.5).ravel(), (p > 0.5).ravel()) for p, t in zip(pa, ta)])
    assert metrics.alpha_iou(pa, ta) == pytest.approx(want, rel=1e-12)
    assert metrics.alpha_iou(np.zeros((6, 6)), np.zeros((6, 6))) == 1.0
    with pytest.raises(ValueError, match="differ"):
        metrics.psnr(a, b[:2])


def test_order_accuracy_is_kendalls_concordance():
    rng = np.random.default_rng(6)
    for _ in range(5):
        true, pred = rng.permutation(5), rng.permutation(5)
        tau = kendalltau(np.argsort(pred), np.argsort(true)).statistic
        assert metrics.pairwise_order_accuracy(pred, true) == pytest.approx((tau + 1) / 2)
    assert metrics.pairwise_order_accuracy([[2, 0, 1]], [[2, 0, 1]]) == 1.0


def test_regions_adherence_and_coherence():
    regions = np.zeros((2, 4, 4), bool)
    regions[0, :, :3] = regions[1, :, 2:] = True  # overlap in column 2; region 1 on top
    visible = metrics.visible_regions(regions)
    assert visible[1].sum() == 8 and visible[0].sum() == 8 and not visible[0, :, 2].any()
    assigned = np.full((4, 4), -1)
    assigned[:, :2], assigned[:, 2:] = 0, 1  # instance 1 shows in the overlap: right order
    assert metrics.region_adherence(assigned, regions) == 1.0
    assert metrics.occlusion_order_accuracy(assigned, regions) == 1.0
    assigned[:, 2] = 0  # instance 0 in the overlap: wrong order, still inside its region
    assert metrics.region_adherence(assigned, regions) == 1.0
    assert metrics.occlusion_order_accuracy(assigned, regions) == 0.0
    assigned[:2, 0] = 1  # 2 of instance 1's 6 pixels outside its region
    assert metrics.region_adherence(assigned, regions) == pytest.approx((6 / 6 + 4 / 6) / 2)
    assigned[:] = 0  # instance 1 missing: it counts 0, and the order is wrong
    assert metrics.region_adherence(assigned, regions) == pytest.approx(12 / 16 / 2)
    assert metrics.occlusion_order_accuracy(assigned[None], regions[None]) == 0.0
    s = ls.scene(16, np.random.default_rng(7))
    c = metrics.layer_coherence(s["background"], s["foregrounds"][0], s["inputs"])
    assert c["recomposition"] < 1e-10  # pixels with alpha < 0.05 (> 0.95) differ by at most
    assert max(c["outside"], c["inside"]) < 0.05 ** 2  # 0.05 from the background (foreground)
    assert metrics.recomposition_error(s["background"], s["foregrounds"], s["inputs"]) < 1e-10
    off = metrics.layer_coherence(s["background"], s["foregrounds"][0], s["background"])
    assert off["inside"] > 1e-3 and off["outside"] < 0.05 ** 2


def test_palette_scenes_have_distinct_colours_and_transparent_absent_layers():
    palette = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    counts = set()
    for seed in range(12):
        s = ls.scene(8, np.random.default_rng(seed), n_foregrounds=2, min_foregrounds=0,
                     palette=palette, plain=True, reflection=False)
        present = s["labels"] >= 0
        counts.add(int(present.sum()))
        assert (s["colours"] >= 0).tolist() == present.tolist()
        assert len(set(s["colours"][present])) == present.sum()
        assert (s["foregrounds"][~present] == 0).all()
        for k in np.flatnonzero(present):  # the object's pixels carry its palette colour
            on = s["masks"][k] > 0.99
            np.testing.assert_allclose(s["foregrounds"][k][on][:, :3],
                                       np.broadcast_to(palette[s["colours"][k]], (on.sum(), 3)))
        assert np.ptp(s["background"]) == 0
    assert counts == {0, 1, 2}
    with pytest.raises(ValueError, match="palette of 1 colours"):
        ls.build_scenes(data_dir="unused", n_foregrounds=2, palette=palette[:1])
