"""report.md and figures of the LayerDecomp reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.layered.plots import image_grid

METRICS = {"background_psnr": ("background PSNR (dB)", ".2f"),
           "alpha_iou": ("alpha IoU (alpha > 0.1: object + effects)", ".3f"),
           "object_iou": ("object IoU (alpha > 0.5)", ".3f"),
           "effects_alpha_mae": ("alpha MAE on shadow/reflection pixels", ".3f"),
           "recomposition_mse": ("recomposition MSE", ".5f")}


def _values(results, condition, key) -> np.ndarray:
    return np.array([s[key] for s in results["conditions"][condition]["per_seed"]])


def claims(results: dict) -> list[kit.Claim]:
    s = {c: v["summary"] for c, v in results["conditions"].items()}
    out = []
    if {"with", "without"} <= set(s):
        iou_w, iou_o = _values(results, "with", "alpha_iou"), _values(results, "without",
                                                                     "alpha_iou")
        mae_w, mae_o = (_values(results, c, "effects_alpha_mae") for c in ("with", "without"))
        out.append(kit.Claim(
            "the consistency loss teaches the transparent foreground its visual effects where "
            "no layer annotation exists",
            f"alpha IoU with {kit.pm(s['with']['alpha_iou'], '.3f')}, without "
            f"{kit.pm(s['without']['alpha_iou'], '.3f')}; effect-pixel alpha MAE with "
            f"{kit.pm(s['with']['effects_alpha_mae'], '.3f')}, without "
            f"{kit.pm(s['without']['effects_alpha_mae'], '.3f')}",
            bool(np.all(iou_w > iou_o) and np.all(mae_w < mae_o)),
            f"IoU higher and MAE lower in {int(np.sum((iou_w > iou_o) & (mae_w < mae_o)))} "
            f"of {len(iou_w)} seeds (paired by seed)"))
        rec_w, rec_o = (_values(results, c, "recomposition_mse") for c in ("with", "without"))
        out.append(kit.Claim(
            "the predicted layers recompose into the input image",
            f"recomposition MSE with {kit.pm(s['with']['recomposition_mse'], '.5f')}, "
            f"without {kit.pm(s['without']['recomposition_mse'], '.5f')}",
            bool(np.all(rec_w < rec_o)), f"lower with the loss in {int(np.sum(rec_w < rec_o))} "
            f"of {len(rec_w)} seeds"))
    base = results["baselines"]["input_as_background_psnr"]
    for c, v in s.items():
        psnr = _values(results, c, "background_psnr")
        out.append(kit.Claim(
            f"a clean background with the object and its effects removed ({c} the loss)",
            f"background PSNR {kit.pm(v['background_psnr'])} dB vs {base:.2f} dB for the "
            f"input itself", bool(np.all(psnr > base + 1.0)),
            "needs > 1 dB over the input on every seed"))
    out.append(kit.Claim("better than prior methods on real photos and in user studies",
                         "no real photos or prior methods here", None,
                         "synthetic scenes only"))
    return out


def figures(r, test: dict, predictions: dict, curves: dict) -> None:
    n = min(6, len(test["inputs"]))
    columns = {"input": test["inputs"], "true bg": test["background"],
               "true fg": test["foregrounds"][:, 0]}
    for c, p in predictions.items():
        columns[f"bg ({c})"] = p["background"]
        columns[f"fg ({c})"] = p["foreground"]
    image_grid(r, "samples.png", columns, n)
    with r.figure("loss.png", 1, 3, figsize=(9, 2.6)) as (_, axes):
        for ax, term in zip(axes, ("supervised", "background", "consistency")):
            for c, runs in curves.items():
                ax.plot(np.stack([x[term] for x in runs]).mean(0), label=c, lw=1)
            ax.set(xlabel="step", ylabel=f"{term} loss (seed mean)", yscale="log")
        axes[0].legend(title="consistency loss")


def markdown(config, results: dict, timings: dict) -> list[str]:
    d = config.data
    rows = [[label, *(kit.pm(v["summary"][key], fmt) for v in results["conditions"].values())]
            for key, (label, fmt) in METRICS.items()]
    return [
        "# LayerDecomp (Yang et al., 2024), small", "",
        f"A dilated conv net (width {config.model.width}, dilations "
        f"{tuple(config.model.dilations)}) decomposes {d.size}x{d.size} composites into a "
        f"background and an RGBA foreground. {d.n_labelled} labelled scenes (all layers; "
        f"shadows only: the simulated data), {d.n_unlabelled} unlabelled pairs (composite + "
        f"clean background, shadows and reflections: the camera-captured data), "
        f"{config.train.steps} Adam steps, consistency weight {config.consistency_weight}; "
        f"{len(kit.train_seeds(config))} training seeds per condition; metrics on "
        f"{d.n_test} held-out scenes with both effects.", "",
        *kit.claims_table(claims(results)), "",
        *kit.table(["metric", *(f"{c} consistency loss" for c in results["conditions"])],
                   rows), "",
        "What is simplified: the scenes are synthetic (procedural textures, three shapes, "
        "a blurred offset shadow, a fading mirrored reflection), the model is a small "
        "regression net instead of the paper's diffusion transformer, and the "
        "\"camera-captured\" pairs are synthetic scenes whose foreground layer is withheld. "
        "Inferred: the consistency loss composites the predicted foreground on the known "
        "background (our reading of the abstract).", "",
        "Figures: samples.png (first seed's predictions on held-out scenes; RGBA over a "
        "checkerboard), loss.png.", "", f"Timings: {kit.timings_line(timings)}."]
