"""Temporal encoders and multi-view fusion (models/temporal.py, models/fusion.py), the
synthetic crop views (train/crop_views.py) and the crop_mvl smoke run."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mechinterp
from mechinterp.models.fusion import FUSIONS, log_mean_prob, make_fusion
from mechinterp.models.temporal import Recurrent, TemporalAttention, positional_encoding
from mechinterp.train.crop_views import CLASSES, CropViews, label_budget, model_inputs

DOC = Path(__file__).resolve().parents[1] / "docs" / "sites.md"
X = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_matches_torch(cell):
    """flax's cells under nn.RNN equal torch.nn.LSTM / GRU with the same weights (1e-5)."""
    torch = pytest.importorskip("torch")
    ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](5, 6, batch_first=True)
    w = {k: v.detach().numpy() for k, v in ref.named_parameters()}
    w_ih, w_hh = (np.split(w[k], 4 if cell == "lstm" else 3) for k in ("weight_ih_l0",
                                                                        "weight_hh_l0"))
    b_ih, b_hh = (np.split(w[k], 4 if cell == "lstm" else 3) for k in ("bias_ih_l0",
                                                                       "bias_hh_l0"))
    if cell == "lstm":  # torch gate order i, f, g, o; flax's OptimizedLSTMCell: i, f, g, o
        params = {f"{io}{g}": {"kernel": wm[k].T, **({"bias": b_ih[k] + b_hh[k]} if io == "h"
                                                     else {})}
                  for k, g in enumerate("ifgo") for io, wm in (("i", w_ih), ("h", w_hh))}
    else:  # torch r, z, n; flax r, z, n with n's hidden bias inside the reset product
        params = {f"i{g}": {"kernel": w_ih[k].T, "bias": b_ih[k]} for k, g in enumerate("rzn")}
        params |= {f"h{g}": {"kernel": w_hh[k].T, **({"bias": b_hh[k]} if g == "n" else {})}
                   for k, g in enumerate("rzn")}
        params["ir"]["bias"] = b_ih[0] + b_hh[0]
        params["iz"]["bias"] = b_ih[1] + b_hh[1]
    model = Recurrent(cell, 6)
    init = model.init(jax.random.key(0), X)["params"]
    params = jax.tree.map(jnp.asarray, {"cell": params})
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init)
    _, cache = mechinterp.capture(model, params, X)
    expected = ref(torch.from_numpy(X))[0].detach().numpy()
    np.testing.assert_allclose(cache["rnn.hidden"], expected, atol=1e-5)


@pytest.mark.parametrize("lightweight", [False, True])
def test_temporal_attention_matches_float64_formula(lightweight):
    """TAE: query from the temporal mean, whole-embedding values; L-TAE: learned master
    query per head, values split by head (float64 numpy, 1e-5)."""
    model = TemporalAttention(width=8, n_heads=2, d_key=3, lightweight=lightweight)
    variables = model.init(jax.random.key(1), X)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    e = X @ p["proj"]["kernel"] + p["proj"]["bias"]
    e = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-6)
    e = e * p["norm"]["scale"] + p["norm"]["bias"] + positional_encoding(7, 8)
    k = np.einsum("btd,dhk->bthk", e, p["key"]["kernel"]) + p["key"]["bias"]
    q = (np.broadcast_to(p["query"], (3, 2, 3)) if lightweight else
         np.einsum("bd,dhk->bhk", e.mean(1), p["query"]["kernel"]) + p["query"]["bias"])
    s = np.einsum("bhk,bthk->bht", q, k) / np.sqrt(3)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    z = (np.einsum("bht,bthd->bhd", a, e.reshape(3, 7, 2, 4)) if lightweight
         else np.einsum("bht,btd->bhd", a, e))
    out = np.maximum(z.reshape(3, -1) @ p["out"]["kernel"] + p["out"]["bias"], 0)
    features, cache = mechinterp.capture(model, variables["params"], X)
    np.testing.assert_allclose(cache["attn.pattern"], a, atol=1e-5)
    np.testing.assert_allclose(features, out, atol=1e-5)
    assert cache["attn.z"].shape == ((3, 2, 4) if lightweight else (3, 2, 8))


VIEWS = [X, X[..., :2] * 2, X[..., 3:] - 1]


def test_fusion_sites_and_predictions():
    """Per-view encoder sites carry a view axis; hybrid predicts the mean probability of its
    heads; an intervention on one view's features changes the prediction; the training
    heads are one per prediction (input/feature/decision), per view (ensemble: independent
    models) or fused + per view (hybrid)."""
    sites = mechinterp.list_sites(make_fusion("hybrid", "tempcnn", 4, width=8), *VIEWS)
    assert sites["conv.hidden"].shape == (3, 3, 3, 7, 8)  # view, layer, batch, time, hidden
    assert sites["conv.hidden"].axes == ("view", "layer", "batch", "time", "hidden")
    assert sites["fused"].shape == (3, 24) and sites["view_logits"].shape == (3, 3, 4)
    model = make_fusion("hybrid", "ltae", 4, width=8, n_heads=2)
    params = model.init(jax.random.key(2), *VIEWS)["params"]
    logits, cache = mechinterp.capture(model, params, *VIEWS)
    heads = jnp.concatenate([cache["fused_logits"][None], cache["view_logits"]])
    np.testing.assert_allclose(np.exp(logits), jax.nn.softmax(heads).mean(0), atol=1e-6)
    np.testing.assert_allclose(log_mean_prob(heads), logits, atol=1e-5)
    patched = mechinterp.intervene(model, params, *VIEWS, interventions={
        "features": mechinterp.Intervention(scale=0.0, add=0.0,
                                            mask=jnp.array([1.0, 0, 0])[:, None, None])})
    assert not np.allclose(patched, logits)
    n_heads = {"input": 1, "feature": 1, "decision": 1, "ensemble": 3, "hybrid": 4}
    assert set(FUSIONS) == set(n_heads)
    for fusion, n in n_heads.items():
        model = make_fusion(fusion, "ltae", 4, width=8, n_heads=2)
        stack, weights = jax.eval_shape(
            lambda m=model: m.init_with_output(jax.random.key(0), *VIEWS, heads=True)[0])
        assert stack.shape == (n, 3, 4) and len(weights) == n


def test_fusion_rejects_bad_views():
    model = make_fusion("feature", "gru", 3, width=4)
    with pytest.raises(ValueError, match="share batch and time"):
        model.init(jax.random.key(0), X, X[:, :5])
    with pytest.raises(ValueError, match="unknown fusion 'late'"):
        make_fusion("late", "gru", 3)
    with pytest.raises(ValueError, match="unknown temporal encoder 'tcn'"):
        make_fusion("input", "tcn", 3).init(jax.random.key(0), X)


def test_site_tables_match_declarations():
    from mechinterp.models.fusion import DecisionFusion, HybridFusion
    from mechinterp.models.temporal import TempCNN

    def rows(title):
        section = DOC.read_text().split(title, 1)[1].split("\n## ", 1)[0]
        found = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
        return {name: (axes.strip(), meaning.strip()) for name, axes, meaning in found}

    def declared(*classes):
        return {k: (", ".join(s.axes), s.meaning) for c in classes for k, s in c.SITES.items()}

    encoders = declared(Recurrent, TempCNN, TemporalAttention)
    assert rows("## Temporal encoders") == encoders
    fusion = {k: v for k, v in declared(HybridFusion, DecisionFusion).items() if k not in encoders}
    assert rows("## Multi-view fusion") == fusion


def test_crop_views_clouds_budgets_and_inputs():
    data = CropViews(600, seed=3, length=12, cloud=0.4)
    optical = data.arrays["optical"]
    assert abs(np.isnan(optical[..., 0]).mean() - 0.4) < 0.05
    assert not np.isnan(data.arrays["radar"]).any()  # radar sees through clouds
    idx = label_budget(data.labels, 7, seed=0)
    np.testing.assert_array_equal(np.bincount(data.labels[idx]), [7] * len(CLASSES))
    with pytest.raises(ValueError, match="labels per class"):
        label_budget(data.labels, 500, seed=0)
    inputs = model_inputs(data.arrays)
    assert inputs[0].shape == (600, 12, 5) and not np.isnan(inputs[0]).any()
    np.testing.assert_array_equal(inputs[0][..., -1] == 0, np.isnan(optical[..., 0]))
    assert set(data[0]) == {"optical", "radar", "weather", "label"}


def test_crop_mvl_smoke(smoke_run):
    workdir = smoke_run("crop_mvl")
    results = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    assert "| paper's claim | ours | reproduced? |" in report
    grid = np.load(workdir / "results.npz")["accuracy_grid"]
    assert grid.shape == (2, 2, 2) and np.all((grid >= 0) & (grid <= 1))
    for budget, w in results["winners"]["accuracy"].items():
        cells = results["cells"]
        accuracy = {c: v[budget]["summary"]["accuracy"]["mean"] for c, v in cells.items()}
        assert w["best"] == max(accuracy, key=accuracy.get)
        assert w["best"] in w["ties"]
    # the best pair of the smoke grid beats chance (1/6) after 20 steps
    assert grid.max() > 1 / 6
