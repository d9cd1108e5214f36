"""report.md of the MIRA reproduction (the expert-usage claim and figure are Moirai-MoE's:
:mod:`mechinterp.experiments.moirai_moe.report`)."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.moirai_moe.report import usage_claim

CT, INDEX, DIRECT = "CT-RoPE + ODE", "index RoPE + ODE", "CT-RoPE + direct"


def _errors(results, variant, split) -> np.ndarray:
    """Per seed: MAE averaged over the sources of ``split``."""
    return np.array([np.mean(list(s[split].values()))
                     for s in results["variants"][variant]["per_seed"]])


def _compare(results, a, b, split, claim, what) -> kit.Claim:
    return kit.lower_claim(claim, what, a, _errors(results, a, split), b,
                           _errors(results, b, split))


def claims(results: dict) -> list[kit.Claim]:
    v = results["variants"]
    out = []
    if CT in v and INDEX in v:
        out.append(_compare(results, CT, INDEX, "test",
                            "continuous-time RoPE models irregular intervals better than "
                            "index positions", "test MAE at irregular target times"))
    if CT in v and DIRECT in v:
        out.append(_compare(results, CT, DIRECT, "test",
                            "the neural-ODE block forecasts at arbitrary target times",
                            "test MAE within the training horizon"))
        out.append(_compare(results, CT, DIRECT, "beyond",
                            "continuous dynamics extrapolate to later target times",
                            "synthetic MAE past the training horizon"))
    first = next(iter(v))
    spec = v[first]["per_seed"]
    between = np.array([s["specialization"]["between"] for s in spec])
    within = np.array([s["specialization"]["within"] for s in spec])
    out.append(usage_claim("the frequency-specific MoE routes by latent frequency regime",
                           between, within, "regimes", "regime", prefix=f"{first}: "))
    out.append(kit.Claim(
        "10% / 7% lower error than other foundation models (OOD / in-distribution)",
        "no medical corpus or foundation-model baselines here", None,
        "needs 454B pretraining points"))
    return out


def markdown(config, results: dict, timings: dict) -> list[str]:
    d, m = config.data, config.model
    lines = ["# MIRA, small: CT-RoPE, frequency MoE and a neural-ODE head", "",
             *kit.claims_table(claims(results)), "",
             f"{config.seeds} training seeds per variant; {results['n_train']} train "
             f"examples of {d.n_context} irregular observations (of {d.context} steps, "
             f"{d.missing:.0%} missing) and {d.n_target} targets in the next {d.horizon} "
             f"steps ('beyond': {d.beyond} steps further); d_model {m.d_model}, "
             f"{m.n_layers} layers, {m.n_experts} experts (top-2) + a sigmoid-gated shared "
             f"expert, aux loss {m.aux_loss_coef}; Huber loss; {config.train.steps} steps.",
             "", "## Test MAE by source (normalised by each example's context)", ""]
    variants = list(results["variants"])
    rows = []
    for split in ("test", "beyond"):
        srcs = list(results["variants"][variants[0]]["summary"][split])
        for src in srcs:
            rows.append([f"{src} ({split})", *(kit.pm(results["variants"][v]["summary"][split]
                                                      [src], ".3f") for v in variants)])
    lines += kit.table(["source", *variants], rows)
    lines += ["", "## What is simplified, inferred or synthetic", "",
              "- No medical data: synthetic sinusoids in three frequency regimes and the "
              "statsmodels series (sunspots, nile, co2, macrodata), irregularly subsampled "
              "with values missing at random; trained in-distribution, small.",
              "- One token per observation with the observed flag as an input feature; "
              "CT-RoPE angles omega_i * (context steps) * t with t in [0, 1) over the "
              "context; the index variant uses the observation's rank.",
              "- The ODE vector field f(h, s) is a tanh MLP (a linen apply) of the state and "
              "the elapsed time s = t* - t_N, integrated with diffrax Tsit5 in a fixed number "
              "of equal steps; the direct head is an MLP of [h(t_N), s].",
              "- Point forecasts with a Huber loss; no quantiles.",
              "", f"Timings: {kit.timings_line(timings)}.", "",
              "![expert usage](expert_usage.png)"]
    return lines
