"""Moirai-MoE (Liu et al., 2024), small: a decoder-only patch forecaster whose experts are
gated by distance to k-means centroids of a pretrained dense model's tokens.

Per training seed: train the dense forecaster on a corpus of synthetic series (three
frequency regimes, trend, random walk) and the statsmodels series' train periods; cluster
its ``ffn_in`` tokens per layer (scikit-learn k-means); train the centroid-gated MoE (top-2,
experts half as wide: equal active parameters) on the same corpus. Compare test errors with
each other and with seasonal naive, ARIMA and ETS on the real series; measure expert usage
by frequency regime and series type (:mod:`mechinterp.experts`), against a same-source
control, and ablate each regime's specialist experts.
"""

from __future__ import annotations

import jax
import numpy as np
from sklearn.cluster import KMeans

from mechinterp import experts
from mechinterp.experiments import kit
from mechinterp.experiments.kit.regress import Regressor
from mechinterp.experiments.moirai_moe import baselines, report
from mechinterp.models.forecaster import ForecasterConfig, MoiraiForecaster
from mechinterp.site_io import capture
from mechinterp.train import irregular

REGIMES = tuple(irregular.REGIMES)
TYPES = {"seasonal": REGIMES, "trend": ("trend",), "random_walk": ("random_walk",)}


def _split(windows, patch):
    context = windows.shape[1] - patch
    norm, _, _ = irregular.normalise(windows, context)
    norm = norm.astype(np.float32)
    n = context // patch
    return {"inputs": norm[:, :context], "next": norm[:, patch:].reshape(-1, n, patch)}


def make_data(config) -> dict:
    """``{"train": arrays, "test": {source: arrays}, "seasons": {real source: period}}``."""
    d = config.data
    window = (d.n_patches + 1) * d.patch
    rng = np.random.default_rng(config.seed)
    train, test = [], {}
    for kind in irregular.KINDS:
        train.append(irregular.synthetic_series(rng, kind, d.n_synthetic, window))
        test[kind] = irregular.synthetic_series(rng, kind, d.n_test, window)
    seasons = {}
    for name, (values, split) in irregular.real_series(d.real_series).items():
        starts = irregular.window_starts(len(values), split, window, d.patch, "train", 1)
        train.append(np.repeat(irregular.regular_windows(values, starts, window),
                               d.real_repeat, axis=0))
        starts = irregular.window_starts(len(values), split, window, d.patch, "test", 1)
        keep = np.unique(np.linspace(0, len(starts) - 1, d.n_test_real).round().astype(int))
        test[name] = irregular.regular_windows(values, starts[keep], window)
        seasons[name] = irregular.season_of(name)
    return {"train": _split(np.concatenate(train), d.patch),
            "test": {k: _split(v, d.patch) for k, v in test.items()}, "seasons": seasons}


def model_config(config, moe: bool) -> ForecasterConfig:
    m = config.model
    common = dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff)
    if not moe:
        return ForecasterConfig(**common)
    return ForecasterConfig(**common, n_experts=m.n_experts, top_k=2,
                            d_expert=m.d_ff // 2, router="centroid", norm_topk=True)


def param_counts(params, n_experts: int, k: int) -> dict:
    """Total parameters and those active per token (``k / n_experts`` of the experts')."""
    total = expert = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        total += leaf.size
        if any(getattr(p, "key", None) == "moe" for p in path):
            expert += leaf.size
    active = total - expert + (expert * k // n_experts if n_experts else 0)
    return {"total": int(total), "active": int(active)}


def centroids_of(model, params, inputs, n_experts: int, seed: int):
    """Per-layer k-means centroids of the ``ffn_in`` tokens, as nested tuples."""
    _, cache = capture(model, params, inputs, sites=["ffn_in"])
    tokens = np.asarray(cache["ffn_in"])                          # (layer, b, pos, d)
    out = []
    for layer in tokens:
        km = KMeans(n_experts, n_init=4, random_state=seed).fit(layer.reshape(-1,
                                                                              layer.shape[-1]))
        out.append(tuple(tuple(map(float, c)) for c in km.cluster_centers_))
    return tuple(out)


def mae_last(pred, arrays) -> float:
    return float(np.mean(np.abs(pred[:, -1] - arrays["next"][:, -1])))


def stacked(test: dict, sources=None) -> tuple[dict, dict]:
    """All sources' arrays in one batch (one compiled shape) and ``{source: slice}``."""
    sources = list(test) if sources is None else list(sources)
    sizes = np.cumsum([0] + [len(test[s]["inputs"]) for s in sources])
    arrays = {k: np.concatenate([test[s][k] for s in sources]) for k in ("inputs", "next")}
    return arrays, {s: slice(a, b) for s, a, b in zip(sources, sizes[:-1], sizes[1:])}


def errors_by_source(pred, arrays, slices) -> dict:
    return {s: mae_last(pred[sl], {"next": arrays["next"][sl]}) for s, sl in slices.items()}


def regressor(config, model) -> Regressor:
    t = config.train
    return Regressor(model, inputs=("inputs",), target="next", steps=t.steps,
                     batch_size=t.batch_size, learning_rate=t.learning_rate, loss="mse",
                     fast_compile=t.fast_compile)


def train(reg, data, seed):
    params, losses = reg.fit(reg.init(seed, data["train"]), data["train"], seed)
    arrays, slices = stacked(data["test"])
    errors = errors_by_source(reg.predict(params, arrays, batch=len(arrays["next"])), arrays,
                              slices)
    return reg, params, losses, errors


def usage_by_source(model, params, test) -> dict:
    """``{source: (layer, expert) share of tokens routed}`` and a same-source control: the
    usage of two halves of each source (``source#a``, ``source#b``)."""
    arrays, slices = stacked(test)
    _, cache = capture(model, params, arrays["inputs"], sites=[experts.WEIGHTS])
    weights = np.asarray(cache[experts.WEIGHTS])                  # (layer, b, pos, expert)
    out = {}
    for src, sl in slices.items():
        w = weights[:, sl]
        half = w.shape[1] // 2
        for tag, part in ((src, w), (f"{src}#a", w[:, :half]), (f"{src}#b", w[:, half:])):
            out[tag] = experts.usage_from_weights(part).fraction / 2
    return out


def tv(p, q) -> float:
    """Total-variation distance between usage distributions, averaged over layers."""
    return float(np.mean(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1)))


def specialization(usage: dict, groups: dict[str, tuple[str, ...]]) -> dict:
    """Mean TV distance between groups' usage (pooled over their sources) and the
    same-source control (halves of one source)."""
    pooled = {g: np.mean([usage[s] for s in srcs], 0) for g, srcs in groups.items()}
    names = list(pooled)
    between = [tv(pooled[a], pooled[b]) for i, a in enumerate(names) for b in names[i + 1:]]
    srcs = [s for g in groups.values() for s in g]
    within = [tv(usage[f"{s}#a"], usage[f"{s}#b"]) for s in srcs]
    return {"between": float(np.mean(between)), "within": float(np.mean(within))}


def ablation(model, reg, params, test, usage) -> dict:
    """Per regime: relative MAE increase on each regime when the regime's specialist
    expert of every layer (highest usage relative to the regimes' mean) is removed."""
    mean_use = np.mean([usage[r] for r in REGIMES], 0)
    arrays, slices = stacked(test, REGIMES)
    base = errors_by_source(reg.predict(params, arrays, batch=len(arrays["next"])), arrays,
                            slices)
    out = {}
    for r in REGIMES:
        ratio = usage[r] / np.maximum(mean_use, 1e-9)
        chosen = [(layer, int(np.argmax(ratio[layer]))) for layer in range(ratio.shape[0])]
        pred = np.asarray(experts.ablate_experts(model, params, arrays["inputs"], chosen))
        ablated = errors_by_source(pred, arrays, slices)
        rel = {s: ablated[s] / base[s] - 1 for s in REGIMES}
        others = np.mean([rel[s] for s in REGIMES if s != r])
        out[r] = {"experts": chosen, "relative_increase": rel, "own": rel[r],
                  "others": float(others), "specificity": float(rel[r] - others)}
    return out


def real_baselines(data) -> dict:
    out = {}
    for src, season in data["seasons"].items():
        a = data["test"][src]
        contexts, truth = a["inputs"], a["next"][:, -1]
        fc = baselines.forecasts(contexts, truth.shape[1], season)
        out[src] = {m: float(np.mean(np.abs(fc[m] - truth)))
                    for m in ("seasonal_naive", "arima", "ets")}
        out[src]["failed_fits"] = fc["failed"]
    return out


def analyse_seed(config, data, seed, r, dense_reg) -> dict:
    """One seed: the dense model (``dense_reg``, compiled once for all seeds), its
    centroids, the MoE model (compiled per seed: its centroids are constants)."""
    k_experts = config.model.n_experts
    dense = dense_reg.model
    with r.phase("train/dense"):
        _, dparams, dlosses, derr = train(dense_reg, data, seed)
    with r.phase("centroids"):
        sample = data["train"]["inputs"][np.random.default_rng(seed).permutation(
            len(data["train"]["inputs"]))[:config.analysis.kmeans_windows]]
        cents = centroids_of(dense, dparams, sample, k_experts, seed)
    with r.phase("train/moe"):
        moe = MoiraiForecaster(model_config(config, True), patch=config.data.patch,
                               centroids=cents)
        reg, mparams, mlosses, merr = train(regressor(config, moe), data, seed)
    with r.phase("experts"):
        usage = usage_by_source(moe, mparams, data["test"])
        real = tuple(data["seasons"])
        spec = {"frequency": specialization(usage, {g: (g,) for g in REGIMES}),
                "series_type": specialization(usage, {**TYPES, "real": real})}
        abl = ablation(moe, reg, mparams, data["test"], usage)
    return {"errors": {"dense": derr, "moe": merr},
            "params": {"dense": param_counts(dparams, 0, 2),
                       "moe": param_counts(mparams, k_experts, 2)},
            "specialization": spec, "ablation": abl,
            "usage": {s: u.tolist() for s, u in usage.items() if "#" not in s},
            "final_loss": {"dense": float(dlosses[-50:].mean()),
                           "moe": float(mlosses[-50:].mean())}}


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = make_data(config)
        with r.phase("baselines"):
            base = real_baselines(data)
        dense = regressor(config, MoiraiForecaster(model_config(config, False),
                                                   patch=config.data.patch))
        per_seed = [analyse_seed(config, data, seed, r, dense)
                    for seed in kit.train_seeds(config)]
        results = {"per_seed": per_seed, "summary": kit.aggregate(
            [{k: v for k, v in s.items() if k != "usage"} for s in per_seed]),
            "baselines": base, "sources": list(data["test"]),
            "n_train_windows": len(data["train"]["inputs"])}
        with r.phase("report"):
            report.figure(r, per_seed[0]["usage"])
            r.write_results(results)
            r.write_report(report.markdown(config, results, r.timings))
