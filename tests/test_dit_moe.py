"""The DiT-MoE reproduction's parts: image sets, the flow objective, the Fréchet distance
(against a closed form), the routing statistics on planted routings, and the smoke run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from mechinterp.experiments.dit_moe.quality import frechet_distance
from mechinterp.experiments.dit_moe.routing import (concentration_by_step, null_preference,
                                                    preference)
from mechinterp.models.diffusion import flow_pair
from mechinterp.train.flow import FlowSource, flow_objective, noise_and_time
from mechinterp.train.images import build_images, load_images


def test_image_sets(tmp_path):
    digits = build_images(data_dir=tmp_path, kind="digits", size=16)
    x, y = load_images(digits, "train")
    x_test, _ = load_images(digits, "test")
    assert x.shape[1:] == (16, 16, 1) and len(x) + len(x_test) == 1797
    assert 0 <= x.min() and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    raw = load_digits()
    rows = np.flatnonzero(raw.target == y[0])   # some digit of its class, pixel-doubled,
    corr = [np.corrcoef(x[0].ravel(), np.kron(raw.images[r], np.ones((2, 2))).ravel())[0, 1]
            for r in rows]                      # is the same picture
    assert max(corr) > 0.9
    shapes = build_images(data_dir=tmp_path, kind="shapes", size=8, per_class=4)
    xs, ys = load_images(shapes, "train")
    assert xs.shape == (18, 8, 8, 3) and np.bincount(ys).tolist() == [3] * 6
    assert xs.std(axis=(1, 2)).min() > 0.01  # textured, not flat
    with pytest.raises(ValueError, match="kind"):
        build_images(data_dir=tmp_path, kind="faces")


def test_flow_source_and_objective():
    images = np.random.default_rng(0).uniform(-1, 1, (5, 4, 4, 1)).astype(np.float32)
    source = FlowSource(images, np.arange(5), repeats=3)
    assert len(source) == 15 and np.array_equal(source[7]["image"], images[2])
    batch = {k: np.stack([source[i][k] for i in (2, 7, 12)]) for k in source[0]}
    eps, t = noise_and_time(batch)
    assert not np.allclose(eps[0], eps[1]) and np.all((0 <= t) & (t <= 1))
    objective = flow_objective()
    x_t, t_in, labels = objective.inputs(batch)
    np.testing.assert_allclose(t_in, t)
    _, target = flow_pair(batch["image"], eps, t)
    terms = objective.terms(jnp.zeros_like(x_t), batch)
    np.testing.assert_allclose(terms["loss"], np.square(np.asarray(target)).mean((1, 2, 3)).sum(),
                               rtol=1e-5)
    assert terms["weight"] == 3 and objective.terms(target, batch)["loss"] == 0


def test_frechet_distance_matches_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 2))
    b = rng.normal(size=(20000, 2)) * [2.0, 1.0] + [1.0, 0.0]
    # N(0, I) vs N((1, 0), diag(4, 1)): |mu|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 = 1 + 1
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_routing_statistics_find_planted_preferences():
    rng = np.random.default_rng(0)
    steps, layers, batch, pos, e = 6, 2, 40, 4, 4
    labels = np.repeat(np.arange(4), 10)
    sel = np.zeros((steps, layers, batch, pos, e), bool)
    chosen = rng.integers(e, size=(steps, layers, batch, pos))
    chosen[:3, 0] = np.arange(pos)            # layer 0: early steps route by position
    np.put_along_axis(sel, chosen[..., None], True, axis=-1)
    pref = {f: preference(sel, f, labels) for f in ("step", "class", "position")}
    null = {f: null_preference(sel, f, labels, 0) for f in ("step", "class", "position")}
    assert pref["position"][0] > 2 * null["position"][0]
    assert pref["class"][0] < pref["position"][0]
    conc = concentration_by_step(sel)
    assert conc[0, :3].min() == pytest.approx(0.0) and conc[1].max() < 0.2
    # planted class routing is found in layer 1
    sel2 = np.zeros_like(sel)
    np.put_along_axis(sel2, np.broadcast_to(labels[None, None, :, None],
                                            chosen.shape)[..., None], True, axis=-1)
    assert preference(sel2, "class", labels)[0] == pytest.approx(0.75)
    assert null_preference(sel2, "class", labels, 0)[0] < 0.3


def test_smoke_run_compares_models_and_reads_routing(smoke_run):
    workdir = smoke_run("dit_moe")
    results = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    assert "| paper's claim | ours | reproduced? |" in report and "not FID" in report
    assert "classifier-free guidance scale 3.0" in report and "accuracy, no guidance" in report
    for kind in ("moe", "dense"):
        run = results["per_seed"][kind][0]
        assert np.isfinite(run["loss"]) and 0 < run["loss"] < 10
        for quality in (run["quality"], run["quality_unguided"]):
            assert 0 <= quality["accuracy"] <= 1 and quality["frechet"] >= 0
        assert run["quality"] != run["quality_unguided"]   # guidance changed the samples
        assert (workdir / f"samples_{kind}.png").stat().st_size > 1000
    moe = results["per_seed"]["moe"][0]
    assert moe["active_mlp_params"] - results["per_seed"]["dense"][0]["active_mlp_params"] \
        == 16 * 4  # the router: equal active expert parameters
    conc = np.asarray(moe["routing"]["concentration"])
    assert conc.shape == (1, 4) and np.all((conc >= 0) & (conc <= 1))
    assert np.asarray(moe["edits"]["ablate"]).shape == (2, 1, 4)
