"""report.md of the TransKD reproduction: the claims table and the models' mIoU and FLOPs."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.transkd.distill import METHODS

NAMES = {"teacher": "teacher", "plain": "student, no KD", "feature": "student + feature-map KD",
         "csf": "student + CSF", "base": "TransKD-Base (CSF + PEA)",
         "glmixer": "TransKD-GL-Mixer (Base + GL-Mixer)", "ea": "TransKD-EA (Base + EA)"}


def _values(results, name) -> np.ndarray:
    return np.array([s["miou"] for s in results["models"][name]["per_seed"]])


def _better(results, a: str, b: str, what: str, claim: str) -> kit.Claim:
    """``a`` beats ``b`` on mean mIoU (and in how many seeds)."""
    models = results["models"]
    if a not in models or b not in models:
        return kit.Claim(claim, f"not run ({a} or {b} not in kd.methods)", None)
    va, vb = _values(results, a), _values(results, b)
    wins = int(np.sum(va > vb))
    return kit.Claim(
        claim, f"{what}: {kit.pm(models[a]['summary']['miou'], '.3f')} vs "
               f"{kit.pm(models[b]['summary']['miou'], '.3f')} mIoU; higher in {wins}/{len(va)} "
               f"seeds", bool(va.mean() > vb.mean()),
        "yes = higher seed-mean mIoU (paired: same data, same student initialisation)")


def claims(results) -> list[kit.Claim]:
    models, cost = results["models"], results["cost"]
    kd = [m for m in ("ea", "glmixer", "base") if m in models]
    out = [_better(results, "base", "plain", "TransKD-Base vs no KD",
                   "a KD student beats the same student trained without KD")]
    if kd and "plain" in models:
        best = max(kd, key=lambda m: _values(results, m).mean())
        t, p, s = (_values(results, m).mean() for m in ("teacher", "plain", best))
        closed = (s - p) / (t - p) if t != p else float("nan")
        red = cost["flops_reduction"]
        out.append(kit.Claim(
            "the KD student comes close to the teacher at > 85 % fewer FLOPs",
            f"{NAMES[best]} {s:.3f} vs teacher {t:.3f} vs no KD {p:.3f} mIoU: closes "
            f"{closed:.0%} of the gap; student {cost['student']['gflops'] * 1e3:.1f} vs teacher "
            f"{cost['teacher']['gflops'] * 1e3:.1f} MFLOPs per image ({red:.1%} fewer)",
            bool(red > 0.85 and closed >= 0.5),
            "yes = > 85 % fewer FLOPs and at least half of the teacher - student gap closed"))
    out += [_better(results, "csf", "feature", "CSF vs per-stage 1x1 feature KD",
                    "CSF helps over plain feature-map distillation"),
            _better(results, "base", "csf", "CSF + PEA vs CSF", "PEA helps (on top of CSF)"),
            _better(results, "glmixer", "base", "Base + GL-Mixer vs Base", "GL-Mixer helps"),
            _better(results, "ea", "base", "Base + EA vs Base", "EA helps")]
    return out


def markdown(config, results: dict, timings: dict) -> list[str]:
    d, t, kd = config.data, config.train, config.kd
    cost = results["cost"]
    seeds = len(kit.train_seeds(config))
    lines = [
        "# TransKD (Liu et al., 2023), small: transformer KD for segmentation", "",
        f"Synthetic shape segmentation ({d.size}x{d.size}, {1 + len(d.shapes)} classes: "
        f"background and {', '.join(d.shapes)}; up to {d.n_objects} shapes per image, "
        f"'{d.domain}' domain), {d.n_train} training and {d.n_test} test images. SegFormer-"
        f"style teacher and student (`mechinterp.models.segformer`), each trained {t.steps} "
        f"Adam steps (batch {t.batch_size}, lr {t.learning_rate}, cosine decay) from scratch; "
        f"{seeds} training seeds, each with its own teacher; students of one seed share "
        f"their initialisation. Loss weights: feature maps {kd.w_features}, embeddings "
        f"{kd.w_embeds}. mIoU on the test set, mean ± sd over seeds. Timings: "
        f"{kit.timings_line(timings)}.", "",
        *kit.claims_table(claims(results)), "",
        "## Models", ""]
    rows = []
    for name, m in results["models"].items():
        role = "teacher" if name == "teacher" else "student"
        form = "" if name == "teacher" else " / ".join(str(x) for x in METHODS[name])
        rows.append([NAMES[name], form, kit.pm(m["summary"]["miou"], ".3f"),
                     f"{cost[role]['gflops'] * 1e3:.2f}", f"{cost[role]['params']:,}"])
    lines += kit.table(["model", "feature / embedding KD", "test mIoU", "MFLOPs / image",
                        "parameters"], rows)
    lines += ["", f"FLOPs: XLA's cost analysis of one forward pass (every op, unrolled "
              f"blocks); the student has {cost['flops_reduction']:.1%} fewer. KD modules are "
              f"used in training only, so every student variant has the student's cost.", "",
              "## What is inferred, simplified or synthetic", "",
              "- Data: synthetic shapes (`mechinterp.train.seg_shapes`), not Cityscapes / ACDC "
              "/ NYUv2; models are small and trained from scratch (the paper's students start "
              "from ImageNet-pretrained MiT-B0 in one of its settings; here there is no "
              "pre-training at all).",
              "- Teacher / student: MiT-B2 / MiT-B0 shapes scaled down (widths halved, depth "
              "2 -> 1 per stage, decoder 4x narrower); stage strides 4, 2, 2, 2 on 32x32 images.",
              "- CSF follows the public code's selective-kernel fusion, without its "
              "BatchNorms; feature maps use ReviewKD's HCL loss as the paper does.",
              "- PEA: a linear map to the teacher's channels; the paper's embedding loss is "
              "channel-wise distillation, here plain MSE (the brief's form).",
              "- GL-Mixer (inferred): global = the shared multi-head attention block over the "
              "embedding's positions, local = a gated 3x3 conv, mixed with learned scalars "
              "and a residual, on every stage (the paper's code mixes only the last stage's "
              "embedding, which here is a 1x1 grid).",
              "- EA: an extra overlapping patch embedding with the teacher's channels on each "
              "stage's input, added to the PEA output with learned scalar weights initialised "
              "as in the public code (0.1 i and 0.1 (i + 4)).", ""]
    return lines
