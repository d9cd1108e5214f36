"""LayerDecomp, small (configs/layer_decomp.py): the losses on exact layers, and the smoke run."""

import json

import jax.numpy as jnp
import numpy as np

from mechinterp.experiments import layer_decomp
from mechinterp.train import layered_scenes as ls


class Oracle:
    """A "model" that returns the true layers of the scenes it was built with."""

    def __init__(self, *scenes):
        self.out = {s["inputs"].tobytes(): (s["background"], s["foregrounds"][0]) for s in scenes}

    def apply(self, variables, x):
        bg, fg = zip(*[self.out[np.asarray(xi).tobytes()] for xi in x])
        return jnp.stack(bg), jnp.stack(fg)


def test_losses_vanish_on_the_true_layers_and_consistency_sees_a_missing_effect():
    rng = np.random.default_rng(0)
    scenes = [ls.scene(8, rng) for _ in range(3)]
    batch = {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}
    terms = layer_decomp.losses(Oracle(*scenes), None, batch, batch)
    assert max(float(v) for v in terms.values()) < 1e-10
    flat = [dict(s, foregrounds=s["foregrounds"].copy()) for s in scenes]
    for s, m in zip(flat, batch["masks"]):
        s["foregrounds"][0, ..., 3] = m[0]  # effects dropped from the foreground layer
    terms = layer_decomp.losses(Oracle(*flat), None, batch, batch)
    assert float(terms["consistency"]) > 1e-4 and float(terms["background"]) < 1e-10


def test_smoke_run_reports_both_conditions(smoke_run):
    workdir = smoke_run("layer_decomp")
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["conditions"]) == {"with", "without"}
    for c in results["conditions"].values():
        s = c["per_seed"][0]
        assert 0 <= s["alpha_iou"] <= 1 and 0 <= s["object_iou"] <= 1
        assert np.isfinite(s["background_psnr"]) and s["recomposition_mse"] >= 0
    assert results["baselines"]["input_as_background_psnr"] > 5
    assert (workdir / "samples.png").stat().st_size > 1000
    report = (workdir / "report.md").read_text()
    assert "consistency loss" in report and "synthetic" in report
