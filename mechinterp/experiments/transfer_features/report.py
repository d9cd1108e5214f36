"""report.md and figures of the transferable-features reproduction: accuracy vs the number of
copied layers (the paper's Figure 2), near vs far task pairs, random features, and where A-
and B-specific channels sit."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit

SPECIFIC = 0.5  # |specificity| above which a channel counts as task-specific
MARGIN = 0.01  # accuracy differences below one point count as ties


def specificity_summary(spec: np.ndarray, joint_accuracy: list[float]) -> dict:
    """Per block, over seeds: mean |specificity| and the share of task-specific channels."""
    spec = np.abs(spec)  # (seed, layer, channel)
    return {"mean_abs": kit.aggregate([list(map(float, s.mean(-1))) for s in spec]),
            "specific_share": kit.aggregate([list(map(float, (s > SPECIFIC).mean(-1)))
                                             for s in spec]),
            "joint_accuracy": kit.aggregate(joint_accuracy)}


def _per_seed(split: dict, key: str) -> np.ndarray:
    return np.array([s[key] for s in split["per_seed"]], float)


def _share(mask) -> str:
    return f"{int(np.sum(mask))} of {len(mask)} seeds"


def claims(per_split: dict) -> list[kit.Claim]:
    main = next(iter(per_split))
    s = per_split[main]
    base_b = _per_seed(s, "baseB")
    curves = {c: _per_seed(s, c) for c in ("AnB", "AnB+", "BnB", "BnB+", "random")}
    depth = curves["AnB"].shape[1]
    mid = slice(1, depth - 1) if depth > 2 else slice(0, depth)
    dip = base_b - curves["BnB"][:, mid].min(1)
    gap_plus = np.abs(curves["BnB+"] - base_b[:, None]).max(1)
    fall = curves["AnB"][:, 0] - curves["AnB"][:, -1]
    boost = (curves["AnB+"] - base_b[:, None]).mean(1)
    random_gap = (curves["AnB"] - curves["random"])[:, 1:].mean(1)
    out = [
        kit.Claim("BnB (frozen, selffer) dips in the middle layers: fragile co-adaptation",
                  f"{main}: baseB {kit.pm(kit.aggregate(list(base_b)))}, min BnB over middle "
                  f"n lower by {kit.pm(kit.aggregate(list(dip)))}",
                  bool(dip.mean() > MARGIN and (dip > 0).sum() * 2 > len(dip)),
                  f"dip > 0 in {_share(dip > 0)}; threshold {MARGIN}"),
        kit.Claim("BnB+ (fine-tuned) stays at baseB at every n",
                  f"largest |BnB+ - baseB| over n: {kit.pm(kit.aggregate(list(gap_plus)))}",
                  bool(gap_plus.mean() < 2 * MARGIN), f"threshold {2 * MARGIN}"),
        kit.Claim("AnB falls as more (more specific) layers are transferred",
                  f"AnB(n=1) - AnB(n={depth}): {kit.pm(kit.aggregate(list(fall)))}",
                  bool(fall.mean() > MARGIN), f"positive in {_share(fall > 0)}"),
        kit.Claim("AnB+ (transfer, then fine-tune) generalizes at least as well as baseB",
                  f"mean over n of AnB+ - baseB: {kit.pm(kit.aggregate(list(boost)), '+.3f')}",
                  bool(boost.mean() > -MARGIN / 2), f">= 0 in {_share(boost >= 0)}"),
        kit.Claim("frozen random features are worse than transferred ones beyond n=1",
                  f"mean over n>=2 of AnB - random: {kit.pm(kit.aggregate(list(random_gap)))}",
                  bool(random_gap.mean() > MARGIN), f"positive in {_share(random_gap > 0)}"),
    ]
    if "near" in per_split and "far" in per_split:
        falls = {k: (lambda a: a[:, 0] - a[:, -1])(_per_seed(per_split[k], "AnB"))
                 for k in ("near", "far")}
        out.append(kit.Claim(
            "transferability drops more with depth between distant tasks",
            f"AnB fall n=1 -> n={depth}: far {kit.pm(kit.aggregate(list(falls['far'])))}, "
            f"near {kit.pm(kit.aggregate(list(falls['near'])))}",
            bool(falls["far"].mean() > falls["near"].mean() + MARGIN),
            f"far > near in {_share(falls['far'] > falls['near'])}"))
    if "ablation" in s:
        share = [x["mean"] for x in s["ablation"]["mean_abs"]]
        out.append(kit.Claim(
            "features go from general (lower layers) to task-specific (top)",
            f"{main}: mean |specificity| of conv.hidden channels by block " +
            ", ".join(f"{v:.2f}" for v in share),
            bool(share[-1] > share[0]), "joint A+B network, mean ablation per channel"))
    return out


def figures(r, per_split: dict, arrays: dict, layers: list[str]) -> None:
    n = np.arange(1, len(layers) + 1)
    with r.figure("transfer.png", 1, len(per_split), figsize=(4 * len(per_split), 3.2),
                  squeeze=False) as (_, axes):
        for ax, (split, s) in zip(axes[0], per_split.items()):
            for condition, style in (("AnB", "r-o"), ("AnB+", "r--s"), ("BnB", "b-o"),
                                     ("BnB+", "b--s"), ("random", "k:^")):
                values = _per_seed(s, condition)
                ax.errorbar(n, values.mean(0), values.std(0), fmt=style, label=condition,
                            capsize=2, ms=4)
            ax.axhline(_per_seed(s, "baseB").mean(), color="gray", lw=1, label="baseB")
            ax.set(title=split, xlabel="layers copied (n)", ylabel="test accuracy on B",
                   xticks=n)
        axes[0][0].legend()
    specs = [k for k in arrays if k.endswith("/specificity")]
    if specs:
        with r.figure("specificity.png", 1, len(specs), figsize=(4 * len(specs), 2.6),
                      squeeze=False) as (fig, axes):
            for ax, key in zip(axes[0], specs):
                im = ax.imshow(arrays[key][0], cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
                ax.set(title=f"{key.split('/')[0]}: A-specific (red) vs B (blue)",
                       xlabel="channel", ylabel="block")
            fig.colorbar(im, ax=axes[0, -1])


def markdown(config, per_split: dict, timings: dict) -> list[str]:
    lines = ["# How transferable are features? (Yosinski et al., 2014), small", "",
             f"Residual CNN (width {config.model.width}, stem + {config.model.n_layers} "
             f"blocks, no BatchNorm), {config.train.steps} Adam steps per network, "
             f"{len(kit.train_seeds(config))} training seeds; accuracy on task B's test set. "
             "Claims judged on the first task pair; figures: transfer.png, specificity.png.",
             "", *kit.claims_table(claims(per_split)), ""]
    for split, s in per_split.items():
        c = s["curves"]
        lines += [f"## {split}: baseA on A {kit.pm(c['baseA_on_A'])}, baseB "
                  f"{kit.pm(c['baseB'])}", ""]
        rows = [[n + 1] + [kit.pm(c[k][n]) for k in ("AnB", "AnB+", "BnB", "BnB+", "random")]
                for n in range(len(c["AnB"]))]
        lines += kit.table(["n", "AnB", "AnB+", "BnB", "BnB+", "random"], rows) + [""]
        if "ablation" in s:
            a = s["ablation"]
            lines += [f"Channel ablation (joint A+B net, accuracy {kit.pm(a['joint_accuracy'])}"
                      f"): per block, mean |specificity| and share with |s| > {SPECIFIC}", ""]
            lines += kit.table(["block", "mean |s|", "specific share"],
                               [[i, kit.pm(m), kit.pm(f)] for i, (m, f) in enumerate(
                                   zip(a["mean_abs"], a["specific_share"]))]) + [""]
    lines += [f"Timings: {kit.timings_line(timings)}."]
    return lines
