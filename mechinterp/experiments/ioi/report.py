"""Figures and report.md of the IOI study: performance per template, the head classes found
next to the GPT-2-small circuit of Wang et al. 2022 (layers as relative depth, layer / n)."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.ioi.dataset import KEY_POSITIONS

GPT2 = {"name_movers": ["9.6", "9.9", "10.0"], "negative_name_movers": ["10.7", "11.10"],
        "s_inhibition": ["7.3", "7.9", "8.6", "8.10"], "induction": ["5.5", "6.9"],
        "duplicate_token": ["0.1", "3.0"]}
WHAT = {"name_movers": "direct path to the logits lowers IO - S when corrupted, attend END->IO",
        "negative_name_movers": "direct path works against IO (corrupting it raises IO - S), "
                                "attend END->IO",
        "s_inhibition": "act through the name movers' queries at END",
        "induction": "attend from S2 to S1+1 (attention only here)",
        "duplicate_token": "attend from S2 to S1 (attention only here)",
        "s_suppression": "direct path lowers IO - S when corrupted, END attends S2",
        "other_direct": "direct path effect, END attends neither name"}


def _depth(heads, n_layers: int) -> str:
    depths = [int(str(h).split(".")[0]) / n_layers for h in heads]
    if not depths:
        return "-"
    low, high = f"{min(depths):.2f}", f"{max(depths):.2f}"
    return low if low == high else f"{low}-{high}"


def _heatmap(fig, ax, values, title, xlabels=None, xlabel="head"):
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = ax.imshow(values, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set(title=title, xlabel=xlabel, ylabel="layer")
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=90)
    fig.colorbar(im, ax=ax)


def figures(r, results: dict, arrays: dict, grid_batches) -> None:
    if grid_batches and "resid_pre_t0" in arrays:
        names = [k for k in ("resid_pre", "attn_out") if f"{k}_t0" in arrays]
        with r.figure("patching_positions.png", 1, len(names),
                      figsize=(5 * len(names), 5), squeeze=False) as (fig, axes):
            for ax, name in zip(axes[0], names):
                _heatmap(fig, ax, arrays[f"{name}_t0"], f"{name}: restored fraction",
                         grid_batches[0].str_tokens, "position (first prompt)")
    panels = [("dla", "DLA per head (IO - S)"), ("heads_t0", "head patching (restored)"),
              ("direct", "path: direct to logits"), ("via_name_movers", "path: via NM queries")]
    panels = [p for p in panels if p[0] in arrays]
    with r.figure("heads.png", 1, len(panels), figsize=(4 * len(panels), 5),
                  squeeze=False) as (fig, axes):
        for ax, (key, title) in zip(axes[0], panels):
            _heatmap(fig, ax, arrays[key], title)
    top = sorted({tuple(h) for c in ("name_movers", "negative_name_movers", "s_suppression",
                                     "s_inhibition", "other_direct")
                  for h in results["classes"][c]})[:16]
    if top:
        with r.figure("attention.png", figsize=(max(4, len(top)), 3)) as (fig, ax):
            x = np.arange(len(top))
            for k, key in enumerate(("END->IO", "END->S1", "END->S2")):
                ax.bar(x + 0.27 * (k - 1), [arrays[f"attn_{key}"][l, h] for l, h in top],
                       0.27, label=key)
            ax.set_xticks(x, [f"L{l}H{h}" for l, h in top])
            ax.set(ylabel="attention", title="top heads: attention from END")
            ax.legend()


def _fmt(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    return f"{np.mean(values):+.2f}" + (f" ± {np.std(values, ddof=1):.2f}"
                                        if len(values) > 1 else "")


def _transition(arrays, batch, n_layers):
    """First layer from which patching resid_pre at END restores >= half of the gap."""
    if "resid_pre_t0" not in arrays:
        return None
    end = arrays["resid_pre_t0"][:, batch.positions["END"][0]]
    s2 = arrays["resid_pre_t0"][:, batch.positions["S2"][0]]
    if not (end >= 0.5).any():
        return None
    layer = int(np.argmax(end >= 0.5))
    return layer, float(s2[:layer].max()) if layer else float("nan")


def report_markdown(config, results: dict, arrays: dict, timings: dict, batch=None) -> list:
    n, heads, classes = results["n_layers"], results["heads"], results["classes"]
    per_t = results["templates"]
    diffs = [t["logit_diff"] for t in per_t]
    acc = np.mean([t["accuracy"] for t in per_t])
    found = {c: [f"{l}.{h}" for l, h in hs] for c, hs in classes.items()}

    def row(c):
        hs = classes[c][:8]
        key = {"s_inhibition": "via_name_movers", "induction": "S2->S1+1",
               "duplicate_token": "S2->S1"}.get(c, "direct")
        detail = "; ".join(f"L{l}H{h} {_fmt(np.atleast_1d(heads[f'L{l}H{h}'][key]))}"
                           for l, h in hs if f"L{l}H{h}" in heads)
        where = (f"at {', '.join(GPT2[c])} (depth {_depth(GPT2[c], 12)})" if c in GPT2
                 else "(no GPT-2 class)")
        return kit.Claim(
            f"{c.replace('_', ' ')} {where}: {WHAT[c]}",
            f"{len(classes[c])} head{'s' * (len(classes[c]) != 1)} (depth {_depth(found[c], n)}): {detail or 'none found'}",
            bool(classes[c]) if c in GPT2 else None,
            "attention only" if c in ("induction", "duplicate_token") else
            f"threshold {config.analysis.threshold} of the gap, mean over "
            f"{len(heads[next(iter(heads))]['direct']) if heads else 0} templates")
    claims = [kit.Claim(
        "the model predicts IO over S (the issue: Mary - John about +6 on SmolLM2)",
        f"IO above S in {acc:.1%} of {sum(t['n_prompts'] for t in per_t)} prompts; logit "
        f"diff {_fmt(diffs)} (sd over {len(diffs)} templates)",
        bool(acc >= 0.8 and min(diffs) > 0), "accuracy >= 80% and every template > 0")]
    claims += [row(c) for c in WHAT]
    if batch is not None and (t := _transition(arrays, batch, n)):
        si = sorted({l for l, _ in classes["s_inhibition"]})
        claims.append(kit.Claim(
            "residual stream: the signal sits at S2, then moves to END in the layers of the "
            "S-inhibition heads (GPT-2: 7-8, depth 0.58-0.67)",
            f"END restores >= half the gap from layer {t[0]} (depth {t[0] / n:.2f}), S2 up "
            f"to {t[1]:.2f} before; S-inhibition heads in layers {si or 'none'}",
            bool(si) and t[1] >= 0.5 and min(si) <= t[0] <= max(si) + 2,
            "first template; moves = END >= 0.5 within 2 layers after an S-inhibition head"))
    lines = [f"# IOI on {results['model']} ({n} layers x {results['n_heads']} heads)", "",
             *kit.claims_table(claims), "",
             "No training seeds: a pretrained model. Spread (±) is the sd over templates. "
             "Relative depth = layer / n_layers (GPT-2 small: 12 layers).",
             f"Runtime: {kit.timings_line(timings)} wall, {results['cpu_s']:.0f} s CPU "
             "(user + sys; 2 CPU cores, shared with other jobs).", "",
             "## Performance per template (clean vs ABC: S2 replaced by a third name)", "",
             *kit.table(["template", "prompts", "IO - S", "IO - S (ABC)", "IO > S", "IO top-1"],
                        [(t["template"], t["n_prompts"], f"{t['logit_diff']:+.2f}",
                          f"{t['logit_diff_abc']:+.2f}", f"{t['accuracy']:.0%}",
                          f"{t['top1']:.0%}") for t in per_t]), "",
             "## Heads", "",
             "Path effects are fractions of the clean - ABC gap (-1: the whole gap); "
             "attention is from the clean runs, mean over prompts.", "",
             *kit.table(["head", "class", "depth", "DLA", "direct", "via NM queries",
                         "head patch", "END->IO", "END->S2", "S2->S1", "S2->S1+1"],
                        [(k, ", ".join(c for c, hs in classes.items()
                                       if tuple(map(int, k[1:].split("H"))) in map(tuple, hs)),
                          f"{int(k[1:].split('H')[0]) / n:.2f}", _fmt(v["dla"]),
                          _fmt(v["direct"]), _fmt(v["via_name_movers"]), _fmt(v["head_patch"]),
                          f"{v['END->IO']:.2f}", f"{v['END->S2']:.2f}", f"{v['S2->S1']:.2f}",
                          f"{v['S2->S1+1']:.2f}") for k, v in heads.items()]), ""]
    lines += ["Figures: `patching_positions.png` (resid_pre / attn_out by layer and position, "
              "first template), `heads.png`, `attention.png`. Key positions: "
              + ", ".join(KEY_POSITIONS) + "."]
    return lines
