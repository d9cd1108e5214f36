"""report.md and the figure of the PVD-AL reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit


def _pairs(results) -> list[str]:
    return list(results["summary"]["pvd_al"])


def _count(results, test) -> tuple[int, int]:
    per_seed = results["per_seed"]
    return sum(bool(test(s)) for s in per_seed), len(per_seed)


def claims(results: dict) -> list[kit.Claim]:
    s = results["summary"]
    pairs = _pairs(results)
    gains = {p: kit.mean_of(s["pvd_al"][p]) - kit.mean_of(s["scratch"][p.split("->")[1]])
             for p in pairs}
    k, n = _count(results, lambda r: all(r["pvd_al"][p] > r["scratch"][p.split("->")[1]]
                                         for p in pairs))
    out = [kit.Claim(
        "distilling an existing field beats training the new architecture from scratch in "
        "the same time, for any teacher -> student pair",
        f"PSNR gain over scratch, mean per pair: "
        + ", ".join(f"{p} {g:+.1f} dB" for p, g in gains.items()),
        k == n, f"every pair better in {k}/{n} seeds")]
    k, n = _count(results, lambda r: all(r["pvd_al"][p] > r["teacher"][p.split("->")[0]] - 1.0
                                         for p in pairs))
    out.append(kit.Claim(
        "the student comes close to its teacher (any-to-any conversion)",
        ", ".join(f"{p} {kit.pm(s['pvd_al'][p], '.1f')} vs teacher "
                  f"{kit.pm(s['teacher'][p.split('->')[0]], '.1f')} dB" for p in pairs),
        k == n, f"every pair within 1 dB in {k}/{n} seeds"))
    for mode, claim in (("render_only", "staged losses (features, density/colour, renders) "
                                        "beat distilling renders only"),
                        ("staged_no_active", "active sampling of hard rays improves the "
                                             "staged distillation")):
        if mode not in s["ablation"]:
            continue
        ps = list(s["ablation"][mode])
        k, n = _count(results, lambda r: np.mean([r["pvd_al"][p] for p in ps])
                      > np.mean([r["ablation"][mode][p] for p in ps]))
        out.append(kit.Claim(
            claim, "; ".join(f"{p}: PVD-AL {kit.pm(s['pvd_al'][p], '.1f')} vs "
                             f"{kit.pm(s['ablation'][mode][p], '.1f')} dB" for p in ps),
            k == n, f"higher mean over these pairs in {k}/{n} seeds"))
    return out


def figure(r, results: dict) -> None:
    s = results["summary"]
    pairs = _pairs(results)
    with r.figure("pvd_al.png", 1, 1, figsize=(max(5, 0.9 * len(pairs)), 3.2)) as (_, ax):
        x = np.arange(len(pairs))
        ax.bar(x - 0.2, [kit.mean_of(s["scratch"][p.split("->")[1]]) for p in pairs], 0.4,
               label="student from scratch")
        ax.bar(x + 0.2, [kit.mean_of(s["pvd_al"][p]) for p in pairs], 0.4,
               label="PVD-AL, same time")
        ax.set_xticks(x, pairs, rotation=30)
        ax.set(ylabel="test-view PSNR (dB)")
        ax.legend()


def markdown(config, results: dict, timings: dict) -> list[str]:
    s = results["summary"]
    lines = ["# PVD-AL (Fang et al., 2023), small: any-to-any field distillation", "",
             f"{config.seeds} seeds; PSNR of renders of {config.data.test_views} held-out "
             f"views. Timings: {kit.timings_line(timings)}.", "",
             *kit.claims_table(claims(results)), "", "## PSNR (dB) on held-out views", ""]
    rows = [(k, kit.pm(s["teacher"][k], ".2f"), kit.pm(s["scratch"][k], ".2f"))
            for k in config.kinds]
    lines += kit.table(["field", f"teacher ({config.teacher_steps} steps)",
                        f"scratch ({config.scratch_steps} steps)"], rows) + [""]
    rows = [(p, kit.pm(s["steps"][p], ".0f"), kit.pm(s["pvd_al"][p], ".2f"),
             *(kit.pm(s["ablation"][m][p], ".2f") if p in s["ablation"].get(m, {}) else "-"
               for m in ("render_only", "staged_no_active")))
            for p in _pairs(results)]
    lines += kit.table(["teacher -> student", "distillation steps in the budget", "PVD-AL",
                        "render-only", "staged, no active"], rows) + [""]
    lines += [
        "## What is simplified, inferred or synthetic", "",
        "- A 2-D flatland scene (soft striped discs) rendered along rays with the NeRF "
        "quadrature, not 3-D NeRF scenes; fields are MLP+PE, dense grid and Instant-NGP "
        "hash grid (no TensoRF / Plenoxels).",
        "- Equal time: each distillation gets the process-CPU seconds of the student's "
        f"{config.scratch_steps} scratch steps (seconds per step measured in the run); the "
        "teacher's own training is not counted (PVD converts an existing model).",
        f"- Stages by step fraction {tuple(config.distill.stages)}: features (all kinds "
        "share one feature width before a common head; the student starts from the teacher's "
        "head, our reading of the unified form), then log-density and colour, then "
        "renders plus density/colour; all parameters train in every stage (the paper's "
        "block-wise schedule is simplified). Distillation draws rays from "
        f"{config.data.pool_views} views the teacher renders, scratch from "
        f"{config.data.train_views} ground-truth views.",
        "- Active learning: half of each batch drawn in proportion to each ray's last "
        "loss (inferred form of the paper's hard-sample mining).",
        "", "![pvd_al](pvd_al.png)"]
    return lines
