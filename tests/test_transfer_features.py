"""The transferable-features reproduction: frozen layers stay bit-identical under the shared
masked Adam step while the rest trains, and the smoke run's curves and ablation arrays have
the paper's layout."""

import json

import jax
import numpy as np

from mechinterp.experiments.kit.classifier import Classifier
from mechinterp.experiments.transfer_features import CONDITIONS, layer_names
from mechinterp.models.cnn import CNN


def test_classifier_freezes_layers_updates_batchnorm_statistics_and_feeds_the_schedule():
    seen = []

    def schedule(step):
        seen.append(step)
        return {}

    model = CNN(n_classes=3, width=4, n_layers=2, scan_layers=False)  # with BatchNorm
    trainer = Classifier(model, steps=3, batch_size=4, learning_rate=1e-2,
                         train_kwargs={"train": True}, schedule=schedule)
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (8, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    start = trainer.init(0, x)
    frozen = layer_names(model)[:2]
    assert frozen == ["stem_conv", "layers_0"]
    variables, losses = trainer.fit(start, x, y, seed=0, frozen=frozen)
    assert seen == [0, 1, 2] and losses.shape == (3,) and np.all(np.isfinite(losses))
    for name in start["params"]:
        same = jax.tree.map(np.array_equal, start["params"][name], variables["params"][name])
        assert all(jax.tree.leaves(same)) == (name in frozen), name
    moved = variables["batch_stats"]["norm"]["mean"] - start["batch_stats"]["norm"]["mean"]
    assert np.abs(np.asarray(moved)).max() > 1e-3  # running means follow the batches
    assert trainer.accuracy(variables, x, y) == np.mean(
        np.asarray(model.apply(variables, x)).argmax(-1) == y)


def test_smoke_run_has_curves_per_depth_and_channel_specificity(smoke_run):
    workdir = smoke_run("transfer_features")
    results = json.loads((workdir / "results.json").read_text())
    depth = len(results["layers"])  # the stem and each residual block
    split = results["splits"]["near"]
    for condition in CONDITIONS:
        values = split["per_seed"][0][condition]
        assert len(values) == depth and all(0 <= v <= 1 for v in values)
    with np.load(workdir / "results.npz") as arrays:
        spec = arrays["near/specificity"]
        assert spec.shape[:2] == (1, depth - 1) and np.all(np.abs(spec) <= 1)
        drop_a, drop_b = arrays["near/drop_A"], arrays["near/drop_B"]
        expected = (drop_a - drop_b) / (np.abs(drop_a) + np.abs(drop_b) + 1e-6)
        np.testing.assert_allclose(spec, expected, rtol=1e-5)
    assert (workdir / "transfer.png").stat().st_size > 0

