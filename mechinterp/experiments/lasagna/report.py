"""report.md and figures of the LASAGNA reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.layered.plots import image_grid


def _seeds(results, *path) -> np.ndarray:
    out = []
    for run in results["per_seed"]:
        for key in path:
            run = run[key]
        out.append(run)
    return np.array(out, float)


def claims(results: dict) -> list[kit.Claim]:
    s = results["summary"]
    joint, mixed = _seeds(results, "joint", "recomposition"), _seeds(results, "independent",
                                                                    "recomposition")
    inside, other = _seeds(results, "in_box"), _seeds(results, "in_other_box")
    soft, data = _seeds(results, "soft_alpha"), _seeds(results, "soft_alpha_data")
    return [
        kit.Claim("background, foreground and composite are generated coherently (the "
                  "composite is the foreground over the background)",
                  f"recomposition MSE joint {kit.pm(s['joint']['recomposition'], '.4f')}, "
                  f"layers and composite from independent samples "
                  f"{kit.pm(s['independent']['recomposition'], '.4f')}",
                  bool(np.all(joint < 0.5 * mixed)),
                  f"joint below half the independent pairing in "
                  f"{int(np.sum(joint < 0.5 * mixed))} of {len(joint)} seeds"),
        kit.Claim("generation follows the location mask",
                  f"foreground share inside its box {kit.pm(s['in_box'])}, inside another "
                  f"sample's box {kit.pm(s['in_other_box'])}",
                  bool(np.all(inside > other + 0.1)),
                  f"> 0.1 above in {int(np.sum(inside > other + 0.1))} of {len(inside)} seeds"),
        kit.Claim("the foreground layer carries the visual effects (soft shadow, reflection)",
                  f"share of semi-transparent alpha pixels {kit.pm(s['soft_alpha'], '.3f')}, "
                  f"data {float(data.mean()):.3f}",
                  bool(np.all((soft > 0.5 * data) & (soft < 2 * data))),
                  "needs within a factor 2 of the data on every seed"),
        kit.Claim("text, foreground and background conditioning; LASAGNABENCH editing",
                  "class + location only, no editing benchmark", None, "not built here")]


def figures(r, samples: dict, losses: np.ndarray) -> None:
    image_grid(r, "samples.png", {"box": samples["boxes"].astype(float),
                                  "background": samples["background"],
                                  "foreground": samples["foreground"],
                                  "composite": samples["composite"]},
               min(8, len(samples["boxes"])))
    with r.figure("loss.png", figsize=(4, 2.6)) as (_, ax):
        ax.plot(losses.mean(0), lw=1)
        ax.set(xlabel="step", ylabel="flow-matching loss (seed mean)", yscale="log")


def markdown(config, results: dict, timings: dict) -> list[str]:
    m, d, e = config.model, config.data, config.eval
    s = results["summary"]
    rows = [[k, *(kit.pm(s[k][q], ".4f") for q in ("recomposition", "outside", "inside"))]
            for k in ("joint", "independent")]
    return [
        "# LASAGNA (Yang et al., 2026), small", "",
        f"One DiT (d_model {m.d_model}, {m.n_layers} layers, patch {m.patch_size}) generates "
        f"background, RGBA foreground and composite as one 10-channel {d.size}x{d.size} image "
        f"from the shape class and the object's box (four joint-attention tokens); flow "
        f"matching for {config.train.steps} steps on {d.n_train} scenes; "
        f"{len(kit.train_seeds(config))} training seeds; {e.n_samples} samples, "
        f"{e.n_steps} Euler steps, conditioning from held-out scenes.", "",
        *kit.claims_table(claims(results)), "",
        *kit.table(["layers vs composite", "recomposition MSE", "MSE to background where "
                    "alpha < 0.05", "MSE to foreground where alpha > 0.95"], rows), "",
        "What is simplified: synthetic scenes (procedural backgrounds, three shapes, "
        "synthesized shadow and reflection) stand in for LASAGNA-48K; class and box tokens "
        "stand in for text prompts and location masks; no editing tasks. The independent "
        "pairing (layers of one sample, composite of another with the same conditioning) is "
        "our baseline, not the paper's.", "",
        "Figures: samples.png (first seed; RGBA over a checkerboard), loss.png.", "",
        f"Timings: {kit.timings_line(timings)}."]
