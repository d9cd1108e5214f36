"""The time-series forecasters (models/forecaster.py), their data (train/irregular.py) and the
Moirai-MoE and MIRA smoke runs: CT-RoPE scores against a float64 reference and their
invariance to a time shift, the diffrax ODE head against float64 RK4, centroid routing
against a numpy nearest-centroid reference, equal active parameters, irregular examples."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechinterp.models.forecaster import (ForecasterConfig, MiraForecaster, MoiraiForecaster,
                                          VectorField, solve_ode)
from mechinterp.site_io import capture, list_sites
from mechinterp.train import irregular

TINY = ForecasterConfig(d_model=8, n_layers=2, n_heads=2, d_ff=8, n_experts=4, d_expert=4,
                        d_shared=4, shared_gated=True, aux_loss_coef=0.02)


def _irregular_batch(b=2, n=6, m=3):
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 1, (b, n)), axis=1).astype(np.float32)
    targets = (times[:, -1:] + np.sort(rng.uniform(0.05, 0.4, (b, m)), axis=1)).astype(
        np.float32)
    values = rng.standard_normal((b, n)).astype(np.float32)
    return values, times, targets


@pytest.fixture(scope="module")
def mira():
    model = MiraForecaster(TINY, time_scale=7.0, ode_hidden=8, ode_steps=4)
    values, times, targets = _irregular_batch()
    params = jax.jit(model.init)(jax.random.key(0), values, times, targets)["params"]
    return model, params, (values, times, targets)


def _rotate(x, angles):
    """Rotate-half RoPE in float64: x (..., d), angles (..., d // 2)."""
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2,
                                                                                -1))
    x1, x2 = np.split(x, 2, axis=-1)
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def test_ct_rope_pattern_matches_float64_reference_and_ignores_time_shifts(mira):
    model, params, (values, times, targets) = mira
    sites = ["attn.q", "attn.k", "attn.pattern"]  # one site list: one compile per model
    out, cache = capture(model, params, values, times, targets, sites=sites)
    q, k = (np.asarray(cache[s], np.float64)[0] for s in ("attn.q", "attn.k"))  # layer 0
    d_head = q.shape[-1]
    omega = 1.0 / 10000.0 ** (np.arange(0, d_head, 2) / d_head)
    angles = (times.astype(np.float64) * 7.0)[..., None] * omega          # (b, n, d/2)
    qr, kr = _rotate(q, angles[:, :, None]), _rotate(k, angles[:, :, None])
    scores = np.einsum("bthd,bshd->bhts", qr, kr) / np.sqrt(d_head)
    n = times.shape[1]
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    ref = np.exp(scores - scores.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(cache["attn.pattern"])[0], ref, atol=2e-5)
    # attention (and the ODE, which sees elapsed time) depends on time differences only
    shifted, moved_cache = capture(model, params, values, times + 3.25, targets + 3.25,
                                   sites=sites)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(out), atol=2e-4)
    np.testing.assert_allclose(np.asarray(moved_cache["attn.pattern"]),
                               np.asarray(cache["attn.pattern"]), atol=1e-5)
    moved = times.copy()
    moved[:, 1:-1] = (times[:, :-2] + times[:, 2:]) / 2   # other times, same order
    index = MiraForecaster(TINY, rope="index", time_scale=7.0, ode_hidden=8, ode_steps=4)
    patterns = [np.asarray(capture(m, params, values, t, targets, sites=sites)[1]
                           ["attn.pattern"]) for m in (index, model) for t in (times, moved)]
    np.testing.assert_allclose(patterns[0], patterns[1], atol=1e-6)  # index RoPE: no times
    assert np.abs(patterns[2] - patterns[3]).max() > 1e-3            # CT-RoPE sees them


def test_ode_head_matches_float64_rk4():
    field = VectorField(16)
    h0 = jax.random.normal(jax.random.key(1), (2, 8))
    params = jax.jit(field.init)(jax.random.key(2), jnp.zeros(()), h0)["params"]
    elapsed = jnp.array([[0.1, 0.35, 0.6], [0.05, 0.2, 0.9]])
    got = np.asarray(jax.jit(solve_ode, static_argnums=(0, 4))(field, params, h0, elapsed, 16))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def f(s, h):
        z = np.tanh(np.concatenate([h, [s]]) @ p64["hidden"]["kernel"] + p64["hidden"]["bias"])
        return z @ p64["out"]["kernel"] + p64["out"]["bias"]

    for b in range(2):
        h, s, ds, want = np.asarray(h0[b], np.float64), 0.0, 1e-3, []
        for target in np.asarray(elapsed[b], np.float64):
            while s < target - 1e-12:
                step = min(ds, target - s)
                k1 = f(s, h)
                k2 = f(s + step / 2, h + step / 2 * k1)
                k3 = f(s + step / 2, h + step / 2 * k2)
                k4 = f(s + step, h + step * k3)
                h, s = h + step / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + step
            want.append(h)
        np.testing.assert_allclose(got[b], np.array(want), atol=1e-4)


def test_centroid_router_selects_the_two_nearest_centroids():
    rng = np.random.default_rng(3)
    cents = rng.standard_normal((2, 4, 8))
    c = ForecasterConfig(d_model=8, n_layers=2, n_heads=2, d_ff=8, n_experts=4, d_expert=4,
                         router="centroid", norm_topk=True)
    model = MoiraiForecaster(c, patch=4, centroids=tuple(tuple(map(tuple, l)) for l in cents))
    series = rng.standard_normal((3, 16)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), series)["params"]
    _, cache = capture(model, params, series,
                       sites=["ffn_in", "moe.topk_indices", "moe.topk_weights"])
    x = np.asarray(cache["ffn_in"], np.float64)                        # (layer, b, pos, d)
    dist = ((x[..., None, :] - cents[:, None, None]) ** 2).sum(-1)     # (layer, b, pos, E)
    nearest = np.argsort(dist, axis=-1)[..., :2]
    np.testing.assert_array_equal(np.asarray(cache["moe.topk_indices"]), nearest)
    sel = -np.take_along_axis(dist, nearest, -1)
    want = np.exp(sel - sel.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(cache["moe.topk_weights"]),
                               want / want.sum(-1, keepdims=True), atol=1e-5)


def test_every_reached_site_is_declared(mira):
    model, params, inputs = mira
    assert set(list_sites(model, *inputs)) == set(MiraForecaster.SITES) - {
        "mlp.pre", "mlp.hidden", "mlp_out"}
    dense = MoiraiForecaster(ForecasterConfig(d_model=8, n_heads=2, d_ff=8), patch=4)
    reached = set(list_sites(dense, jnp.zeros((1, 8))))
    assert reached == {s for s in MoiraiForecaster.SITES if not s.startswith("moe")}


def test_bad_inputs_name_the_culprit(mira):
    model, params, (values, times, targets) = mira
    with pytest.raises(ValueError, match="times"):
        jax.eval_shape(model.apply, {"params": params}, values, times[:, :-1], targets)
    with pytest.raises(ValueError, match="multiple of patch=4"):
        jax.eval_shape(MoiraiForecaster(ForecasterConfig(d_model=8, n_heads=2), patch=4).init,
                       jax.random.key(0), jnp.zeros((1, 10)))
    with pytest.raises(ValueError, match="n_target"):
        irregular.irregular_examples(np.random.default_rng(0), np.zeros((1, 10)), context=8,
                                     n_context=4, n_target=3)


def test_irregular_examples_recover_the_series():
    windows = np.tile(np.arange(40, dtype=np.float64), (5, 1)) * 2.0 + 7.0   # value = 2 t + 7
    ex = irregular.irregular_examples(np.random.default_rng(1), windows, context=32,
                                      n_context=10, n_target=3, missing=0.3)
    t, tt = ex["times"], ex["target_times"]
    assert np.all(np.diff(t, axis=1) > 0) and np.all(tt[:, 0] > t[:, -1])
    assert np.all(t[:, -1] == 31 / 32) and np.all(ex["observed"][:, -1] == 1)
    obs = ex["observed"] > 0
    # the normalisation is affine in the true value 2 * step + 7 (step = time * context)
    for i in range(5):
        a = np.polyfit(2 * t[i][obs[i]] * 32 + 7, ex["values"][i][obs[i]], 1)
        np.testing.assert_allclose(np.polyval(a, 2 * tt[i] * 32 + 7), ex["targets"][i],
                                   atol=1e-4)
    assert np.all(ex["values"][~obs] == 0)


def test_moirai_smoke_run_equal_active_params_and_baselines(smoke_run):
    results = json.loads((smoke_run("moirai_moe") / "results.json").read_text())
    seed = results["per_seed"][0]
    assert seed["params"]["moe"]["active"] == seed["params"]["dense"]["active"]
    assert seed["params"]["moe"]["total"] > seed["params"]["dense"]["total"]
    for layers in seed["usage"].values():      # share of tokens per expert / k sums to 1
        np.testing.assert_allclose(np.sum(layers, axis=-1), 1.0, atol=1e-6)
    for errors in (seed["errors"]["dense"], seed["errors"]["moe"]):
        assert set(errors) == set(results["sources"])
        assert all(np.isfinite(v) and v >= 0 for v in errors.values())
    assert {"nile", "sunspots"} <= set(results["baselines"])
    assert all(0 <= v < 10 for b in results["baselines"].values()
               for k, v in b.items() if k != "failed_fits")


def test_mira_smoke_run_reports_each_variant(smoke_run):
    workdir = smoke_run("mira")
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["variants"]) == {"CT-RoPE + ODE", "CT-RoPE + direct"}
    for v in results["variants"].values():
        run = v["per_seed"][0]
        assert set(run["test"]) == {"low", "mid", "high", "nile"}
        assert all(np.isfinite(x) for x in [*run["test"].values(), *run["beyond"].values()])
        for layers in run["usage"].values():
            np.testing.assert_allclose(np.sum(layers, axis=-1), 1.0, atol=1e-6)
    assert "the neural-ODE block forecasts at arbitrary target times" in (
        workdir / "report.md").read_text()


@pytest.mark.parametrize("cls", [MoiraiForecaster, MiraForecaster])
def test_site_tables_in_docs_match_declarations(cls):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "sites.md").read_text()
    section = text.split(f"`mechinterp.models.forecaster.{cls.__name__}`", 1)[1].split(
        "\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    assert {n: (a.strip(), m.strip()) for n, a, m in rows} == {
        n: (", ".join(s.axes), s.meaning) for n, s in cls.SITES.items()}
