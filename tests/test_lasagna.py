"""LASAGNA, small (configs/lasagna.py): box tokens and regions, and the smoke run."""

import json

import numpy as np

from mechinterp.experiments import lasagna


def test_box_tokens_bound_the_mask_on_the_patch_grid():
    masks = np.zeros((2, 8, 8))
    masks[0, 2:5, 3:8] = 1.0   # rows 2-4 -> patches 1-2, cols 3-7 -> patches 1-3
    masks[1, 0, 0] = 0.9
    tokens = lasagna.box_tokens(masks, patch=2)
    np.testing.assert_array_equal(tokens, [[1, 4 + 1, 8 + 2, 12 + 3], [0, 4, 8, 12]])
    regions = lasagna.box_regions(tokens, size=8, patch=2)
    want = np.zeros((8, 8), bool)
    want[2:6, 2:8] = True
    np.testing.assert_array_equal(regions[0], want)
    assert regions[1].sum() == 4 and regions[1, :2, :2].all()
    assert (regions >= (masks > 0.5)).all()  # every object pixel is inside its box


def test_stacked_layers_round_trip():
    rng = np.random.default_rng(0)
    data = {"background": rng.uniform(size=(2, 4, 4, 3)),
            "foregrounds": rng.uniform(size=(2, 1, 4, 4, 4)),
            "inputs": rng.uniform(size=(2, 4, 4, 3))}
    back = lasagna.split_layers(lasagna.stack_layers(data))
    np.testing.assert_allclose(back["background"], data["background"], atol=1e-12)
    np.testing.assert_allclose(back["foreground"], data["foregrounds"][:, 0], atol=1e-12)
    np.testing.assert_allclose(back["composite"], data["inputs"], atol=1e-12)


def test_smoke_run_reports_coherence_and_location(smoke_run):
    workdir = smoke_run("lasagna")
    run = json.loads((workdir / "results.json").read_text())["per_seed"][0]
    for pairing in ("joint", "independent"):
        assert run[pairing]["recomposition"] >= 0
    assert 0 <= run["in_box"] <= 1 and 0 <= run["in_other_box"] <= 1
    assert 0 < run["soft_alpha_data"] < 1  # the test scenes do carry soft effects
    assert (workdir / "samples.png").stat().st_size > 1000
