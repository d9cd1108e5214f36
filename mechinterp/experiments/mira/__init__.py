"""MIRA (2025), small: continuous-time RoPE, a frequency-specialising MoE and a neural-ODE
head on irregularly sampled series with missing values.

Per training seed and variant (CT-RoPE + ODE, index RoPE + ODE, CT-RoPE + direct head):
train on irregular draws of synthetic series in three frequency regimes and of the
statsmodels series' train periods (Huber loss at random future target times); test MAE
at random target times within the training horizon and (synthetic) beyond it; expert usage
by frequency regime against a same-source control (:mod:`mechinterp.experts`).
"""

from __future__ import annotations

import numpy as np

from mechinterp import experts
from mechinterp.experiments import kit
from mechinterp.experiments.kit.regress import Regressor
from mechinterp.experiments.mira import report
from mechinterp.experiments.moirai_moe import specialization
from mechinterp.experiments.moirai_moe.report import figure as usage_figure
from mechinterp.models.forecaster import ForecasterConfig, MiraForecaster
from mechinterp.site_io import capture
from mechinterp.train import irregular

REGIMES = tuple(irregular.REGIMES)
INPUTS = ("values", "times", "target_times", "observed")
KEYS = (*INPUTS, "targets")


def _examples(rng, windows, d, repeat=1, offset=0):
    return irregular.irregular_examples(
        rng, np.repeat(windows, repeat, axis=0), context=d.context, n_context=d.n_context,
        n_target=d.n_target, missing=d.missing, target_offset=offset)


def _concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def make_data(config) -> dict:
    """``train`` arrays; ``test`` and ``beyond`` (synthetic, targets past the training
    horizon) as ``(arrays, {source: slice})``."""
    d = config.data
    rng = np.random.default_rng(config.seed)
    window = d.context + d.horizon
    far = d.context + d.horizon + d.beyond
    train, test, beyond = [], {}, {}
    for kind in REGIMES:
        train.append(_examples(rng, irregular.synthetic_series(rng, kind, d.n_synthetic,
                                                               window), d))
        test[kind] = _examples(rng, irregular.synthetic_series(rng, kind, d.n_test, window), d)
        beyond[kind] = _examples(rng, irregular.synthetic_series(rng, kind, d.n_test, far), d,
                                 offset=d.horizon)
    for name, (values, split) in irregular.real_series(d.real_series).items():
        starts = irregular.window_starts(len(values), split, window, d.horizon, "train", 1)
        train.append(_examples(rng, irregular.regular_windows(values, starts, window), d,
                               repeat=d.real_repeat))
        starts = irregular.window_starts(len(values), split, window, d.horizon, "test", 1)
        keep = np.unique(np.linspace(0, len(starts) - 1, d.n_test_real).round().astype(int))
        test[name] = _examples(rng, irregular.regular_windows(values, starts[keep], window), d)
    return {"train": _concat(train), "test": _stack(test), "beyond": _stack(beyond)}


def _stack(parts: dict) -> tuple[dict, dict]:
    sizes = np.cumsum([0] + [len(p["targets"]) for p in parts.values()])
    return _concat(list(parts.values())), {
        s: slice(a, b) for s, a, b in zip(parts, sizes[:-1], sizes[1:])}


def make_model(config, variant: str) -> MiraForecaster:
    rope, head = config.variants[variant]
    m = config.model
    c = ForecasterConfig(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                         n_experts=m.n_experts, top_k=2, d_expert=m.d_expert,
                         d_shared=m.d_expert, shared_gated=True, router="softmax",
                         aux_loss_coef=m.aux_loss_coef)
    return MiraForecaster(c, rope=rope, head=head, time_scale=float(config.data.context),
                          ode_hidden=m.ode_hidden, ode_steps=m.ode_steps)


def mae_by_source(pred, stacked) -> dict:
    arrays, slices = stacked
    err = np.abs(pred - arrays["targets"]).mean(-1)
    return {s: float(err[sl].mean()) for s, sl in slices.items()}


def usage_by_regime(model, params, stacked) -> dict:
    """Share of tokens routed per (layer, expert) for each regime and its two halves."""
    arrays, slices = stacked
    _, cache = capture(model, params, *[arrays[k] for k in INPUTS], sites=[experts.WEIGHTS])
    weights = np.asarray(cache[experts.WEIGHTS])
    mask = arrays["observed"]
    out = {}
    for src in REGIMES:
        sl = slices[src]
        w, m = weights[:, sl], mask[sl]
        half = w.shape[1] // 2
        for tag, part, obs in ((src, w, m), (f"{src}#a", w[:, :half], m[:half]),
                               (f"{src}#b", w[:, half:], m[half:])):
            out[tag] = experts.usage_from_weights(part, attention_mask=obs).fraction / 2
    return out


def regressor(config, variant) -> Regressor:
    """One compiled trainer per variant, shared by its seeds."""
    t = config.train
    return Regressor(make_model(config, variant), inputs=INPUTS, target="targets",
                     steps=t.steps, batch_size=t.batch_size, learning_rate=t.learning_rate,
                     loss="huber", fast_compile=t.fast_compile)


def train_variant(reg, data, seed) -> dict:
    model = reg.model
    params, losses = reg.fit(reg.init(seed, data["train"]), data["train"], seed)
    out = {}
    for split in ("test", "beyond"):
        arrays = data[split][0]
        out[split] = mae_by_source(reg.predict(params, arrays, batch=len(arrays["targets"])),
                                   data[split])
    out["final_loss"] = float(losses[-max(1, len(losses) // 10):].mean())
    usage = usage_by_regime(model, params, data["test"])
    out["specialization"] = specialization(usage, {r: (r,) for r in REGIMES})
    out["usage"] = {r: usage[r].tolist() for r in REGIMES}
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = make_data(config)
        per_variant = {}
        for variant in config.variants:
            runs, reg = [], regressor(config, variant)
            for seed in kit.train_seeds(config):
                with r.phase(f"train/{variant}"):
                    runs.append(train_variant(reg, data, seed))
            per_variant[variant] = {"per_seed": runs, "summary": kit.aggregate(
                [{k: v for k, v in x.items() if k != "usage"} for x in runs])}
        results = {"variants": per_variant, "sources": list(data["test"][1]),
                   "n_train": len(data["train"]["targets"])}
        with r.phase("report"):
            first = next(iter(per_variant.values()))["per_seed"][0]["usage"]
            usage_figure(r, first, height=3, colorbar=False, fontsize=None)
            r.write_results(results)
            r.write_report(report.markdown(config, results, r.timings))
