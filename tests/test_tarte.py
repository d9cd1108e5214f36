"""The table transformer and the TARTE reproduction: a row is a set (column order and
masked cells do not matter), column-name embeddings, standardization against
scikit-learn's RobustScaler, contrastive views, and the smoke run's results."""

import json

import jax
import numpy as np
from sklearn.preprocessing import RobustScaler

from mechinterp import capture
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.experiments.tarte import view
from mechinterp.models.table import TableTransformer
from mechinterp.train.tables import name_embedding, standardize


def test_a_row_is_a_set_of_cells_and_masked_cells_are_ignored():
    rng = np.random.default_rng(0)
    model = TableTransformer(d_model=8, n_layers=1, n_heads=2, d_mlp=16)
    names = rng.normal(size=(3, 5, 6)).astype(np.float32)
    values = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 1]] * 3, bool)
    params = jax.jit(model.init, compiler_options=FAST_COMPILE)(
        jax.random.key(0), names, values, mask)["params"]
    apply = jax.jit(model.apply)
    out = apply({"params": params}, names, values, mask)
    perm = np.array([4, 2, 0, 3, 1])
    permuted = apply({"params": params}, names[:, perm], values[:, perm], mask[:, perm])
    np.testing.assert_allclose(permuted, out, atol=1e-5)
    changed = values.copy()
    changed[:, 3] = 100.0  # the masked cell
    np.testing.assert_allclose(apply({"params": params}, names, changed, mask), out, atol=1e-6)
    assert not np.allclose(apply({"params": params}, names, changed, np.ones_like(mask)), out)
    _, cache = capture(model, params, names, values, mask, sites=["readout", "attn.pattern"])
    np.testing.assert_allclose(cache["readout"], out, atol=1e-6)
    assert np.all(cache["attn.pattern"][..., 1 + 3] < 1e-6)  # nobody attends to the gap


def test_name_embeddings_are_fixed_unit_vectors_closer_for_similar_names():
    a, b, c = (name_embedding(n, 64) for n in ("mean radius", "worst radius", "age"))
    np.testing.assert_array_equal(a, name_embedding("mean radius", 64))
    np.testing.assert_allclose([np.linalg.norm(v) for v in (a, b, c)], 1.0, rtol=1e-6)
    assert a @ b > a @ c + 0.2


def test_standardize_is_robust_scaling_in_gaussian_units():
    x = np.random.default_rng(1).lognormal(size=(200, 3))
    expected = RobustScaler().fit_transform(x) * 1.349
    np.testing.assert_allclose(standardize(x), np.clip(expected, -5, 5), rtol=1e-5, atol=1e-5)


def test_views_drop_only_present_cells_and_never_empty_a_row():
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]] * 50, bool)
    values, keep = jax.jit(view, static_argnums=(3, 4))(
        jax.random.key(0), np.zeros((100, 4), np.float32), mask, 0.9, 0.1)
    keep = np.asarray(keep)
    assert not np.any(keep & ~mask) and np.all(keep.any(-1))
    assert keep.sum() < mask.sum()  # some cells were dropped
    assert 0.05 < np.std(np.asarray(values)) < 0.15


def test_smoke_run_scores_every_learner_on_every_table(smoke_run):
    workdir = smoke_run("tarte")
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["raw"]) == {"iris", "diabetes"}
    assert 0.8 < results["raw"]["iris"]["raw/linear"] <= 1  # logistic regression on iris
    assert 0.3 < results["raw"]["diabetes"]["raw/linear"] < 0.6  # ridge R^2 on diabetes
    seed = results["per_seed"][0]
    for table in ("iris", "diabetes"):
        assert set(seed[table]) == {f"{s}/{k}" for s in ("general", "raw+general", "random")
                                    for k in ("linear", "knn")}
        assert all(np.isfinite(v) and v <= 1 for v in seed[table].values())
    with np.load(workdir / "results.npz") as arrays:
        assert arrays["loss/general"].shape == (1, 5) and np.all(arrays["loss/general"] > 0)


def test_site_table_in_docs_matches_the_table_transformer():
    from test_docs import _documented_rows

    documented = _documented_rows("## Table transformer")
    assert documented == {n: (", ".join(s.axes), s.meaning)
                          for n, s in TableTransformer.SITES.items()}
