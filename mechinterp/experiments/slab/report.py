"""report.md and figures of the SLAB reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit

MARGIN = 0.02  # accuracy differences below two points count as ties


def _slope(tokens, seconds) -> float:
    """Growth exponent of time with tokens between the two longest sequences."""
    return float(np.log(seconds[-1] / seconds[-2]) / np.log(tokens[-1] / tokens[-2]))


def _acc(results, variant):
    return results["variants"][variant]["summary"]["accuracy"]


def claims(results: dict) -> list[kit.Claim]:
    v = results["variants"]
    out = []
    if "PRepBN" in v and "LN" in v:
        gap = kit.mean_of(_acc(results, "PRepBN")) - kit.mean_of(_acc(results, "LN"))
        out.append(kit.Claim(
            "PRepBN trains as well as LayerNorm and infers with BatchNorm only",
            f"accuracy PRepBN {kit.pm(_acc(results, 'PRepBN'))} vs LN "
            f"{kit.pm(_acc(results, 'LN'))}", bool(gap > -MARGIN), f"tie within {MARGIN}"))
    if "BN" in v and "LN" in v:
        bn, ln = (v[k]["summary"] for k in ("BN", "LN"))
        worse = kit.mean_of(bn["accuracy"]) < kit.mean_of(ln["accuracy"]) - MARGIN / 2
        out.append(kit.Claim(
            "BatchNorm alone is unstable / worse than LayerNorm in a transformer",
            f"BN accuracy {kit.pm(bn['accuracy'])}, largest late loss spike "
            f"{kit.pm(bn['max_spike'], '.3f')}; LN {kit.pm(ln['max_spike'], '.3f')}",
            bool(worse or kit.mean_of(bn["max_spike"]) > kit.mean_of(ln["max_spike"])),
            "lower accuracy or larger spikes"))
    if "PRepBN+SLA" in v and "LN" in v:
        gap = kit.mean_of(_acc(results, "PRepBN+SLA")) - kit.mean_of(_acc(results, "LN"))
        out.append(kit.Claim(
            "simplified linear attention with PRepBN keeps softmax+LN accuracy",
            f"PRepBN+SLA {kit.pm(_acc(results, 'PRepBN+SLA'))} vs LN "
            f"{kit.pm(_acc(results, 'LN'))}", bool(gap > -MARGIN), f"tie within {MARGIN}"))
    lat = results["latency"]
    soft, lin = (_slope(lat["tokens"], lat[k]) for k in ("softmax", "linear"))
    out.append(kit.Claim(
        "linear attention's cost grows linearly with tokens, softmax's quadratically",
        f"time ~ tokens^k: softmax k={soft:.2f}, linear k={lin:.2f} "
        f"({lat['tokens'][-2]} -> {lat['tokens'][-1]} tokens, CPU)",
        bool(soft > 1.5 and lin < 1.3), "k > 1.5 and k < 1.3"))
    s = results["inference"]
    out.append(kit.Claim(
        "BatchNorm folds into the next linear layer exactly",
        f"max |folded - unfolded| logit {s['fold_max_abs_diff']:.1e}",
        bool(s["fold_max_abs_diff"] < 1e-4), "threshold 1e-4"))
    if "layernorm" in s:
        out.append(kit.Claim(
            "the folded BatchNorm network infers faster than the LayerNorm one",
            f"{s['prepbn_folded'] * 1e3:.2f} ms vs {s['layernorm'] * 1e3:.2f} ms (unfolded "
            f"PRepBN {s['prepbn_unfolded'] * 1e3:.2f} ms) per batch, CPU",
            bool(s["prepbn_folded"] < s["layernorm"]),
            "CPU timing of a tiny model: per-op overhead dominates"))
    return out


def figures(r, curves: dict, latency: dict) -> None:
    with r.figure("slab.png", 1, 2, figsize=(9, 3.2)) as (_, (ax_loss, ax_time)):
        for variant, losses in curves.items():
            losses = np.stack(losses)
            ax_loss.plot(losses.mean(0), label=variant, lw=1)
        ax_loss.set(xlabel="step", ylabel="train loss (seed mean)", yscale="log")
        ax_loss.legend()
        for kind in ("softmax", "linear"):
            ax_time.loglog(latency["tokens"], latency[kind], "o-", label=kind)
        ax_time.set(xlabel="tokens", ylabel="seconds per forward (one layer)")
        ax_time.legend()


def markdown(config, results: dict, timings: dict) -> list[str]:
    lines = ["# SLAB (Guo et al., 2024), small", "",
             f"ViT ({config.model.n_layers} blocks, d_model {config.model.d_model}, patch "
             f"{config.model.patch_size}, mean pooling) on digits, {config.train.steps} Adam "
             f"steps, {len(kit.train_seeds(config))} training seeds; test accuracy in "
             "inference mode (running statistics, lambda = 0). Figure: slab.png.", "",
             *kit.claims_table(claims(results)), ""]
    rows = [[k, *config.variants[k], kit.pm(s["summary"]["accuracy"]),
             kit.pm(s["summary"]["final_loss"], ".3f"), kit.pm(s["summary"]["max_spike"], ".3f"),
             sum(run["finite"] for run in s["per_seed"])]
            for k, s in results["variants"].items()]
    lines += kit.table(["variant", "norm", "attention", "test accuracy", "final loss",
                        "largest late spike", "finite runs"], rows) + [""]
    lat = results["latency"]
    lines += kit.table(["tokens", "softmax ms", "linear ms"],
                       [[t, f"{s * 1e3:.2f}", f"{x * 1e3:.2f}"] for t, s, x in
                        zip(lat["tokens"], lat["softmax"], lat["linear"])]) + [""]
    lines += [f"Timings: {kit.timings_line(timings)}."]
    return lines
