"""The projection-head reproduction: InfoNCE and effective rank against plain numpy, and the
smoke run's layout."""

import json

import numpy as np

from mechinterp.experiments.projection_head import effective_rank, nt_xent


def test_nt_xent_matches_a_loop_over_views():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 5, 3))
    loss = float(nt_xent(z1.astype(np.float32), z2.astype(np.float32), 0.5))
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for i in range(10):
        positive = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        logits = np.array([z[i] @ z[j] / 0.5 for j in others])
        total += -(z[i] @ z[positive] / 0.5 - np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(loss, total / 10, rtol=1e-5)


def test_effective_rank_spans_one_to_one_over_width():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(200, 4)))[0]  # orthonormal columns
    np.testing.assert_allclose(effective_rank(basis * 10), 1.0, atol=0.02)  # equal weights
    single = np.outer(rng.normal(size=200), rng.normal(size=4))
    np.testing.assert_allclose(effective_rank(single), 0.25, atol=1e-6)  # one direction
    assert effective_rank(basis * [8, 4, 2, 1]) < effective_rank(basis * [2, 2, 1, 1])


def test_smoke_run_probes_both_representations(smoke_run):
    workdir = smoke_run("projection_head")
    results = json.loads((workdir / "results.json").read_text())
    run = results["heads"]["mlp"]["per_seed"][0]
    assert set(run["effective_rank"]) == {"stem", "block0", "h", "z"}
    assert all(0 < v <= 1 for v in run["effective_rank"].values())
    for rep in ("probe_h", "probe_z"):
        assert set(run[rep]) == {"test", "shifted"}
    with np.load(workdir / "results.npz") as arrays:
        assert arrays["loss/mlp"].shape == (1, 3)  # seeds x steps
