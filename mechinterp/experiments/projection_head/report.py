"""report.md and figures of the projection-head reproduction."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit

MARGIN = 0.01


def _seeds(per_head, head, *path) -> np.ndarray:
    values = []
    for run in per_head[head]["per_seed"]:
        for key in path:
            run = run[key]
        values.append(run)
    return np.array(values, float)


def _better(claim: str, where: str, names: tuple[str, str], a: np.ndarray, b: np.ndarray,
            verdict: str | None = None) -> kit.Claim:
    """``claim`` holds when ``a`` beats ``b`` by more than MARGIN on the seed mean."""
    return kit.Claim(
        claim, f"{where}: {names[0]} {kit.pm(kit.aggregate(list(a)))}, {names[1]} "
        f"{kit.pm(kit.aggregate(list(b)))}", bool((a - b).mean() > MARGIN),
        verdict or f"{names[0]} > {names[1]} in {int(np.sum(a > b))} of {len(a)} seeds")


def claims(per_head: dict) -> list[kit.Claim]:
    out = []
    if "mlp" in per_head:
        pre, post = (_seeds(per_head, "mlp", f"probe_{k}", "test") for k in "hz")
        out.append(_better("pre-projection representations are better than post-projection "
                           "ones", "MLP head, linear probe", ("h", "z"), pre, post))
        ranks = per_head["mlp"]["summary"]["effective_rank"]
        layers = list(ranks)
        first, last = kit.mean_of(ranks[layers[0]]), kit.mean_of(ranks["z"])
        out.append(kit.Claim(
            "features become increasingly unequal with depth (progressive weighting)",
            "effective rank / width by layer: " + ", ".join(
                f"{k} {kit.mean_of(v):.2f}" for k, v in ranks.items()),
            bool(last < first - MARGIN), f"needs z ({last:.2f}) below {layers[0]} ({first:.2f})"))
        pre_s, post_s = (_seeds(per_head, "mlp", f"probe_{k}", "shifted") for k in "hz")
        out.append(_better("pre-projection representations are more robust to a distribution "
                           "shift", "shifted test set", ("h", "z"), pre_s, post_s))
    if "mlp" in per_head and "none" in per_head:
        head, none = (_seeds(per_head, k, "probe_h", "test") for k in ("mlp", "none"))
        out.append(_better("training through a projection head improves the encoder's "
                           "representation", "probe on h", ("with head", "without"),
                           head, none))
    if "fixed" in per_head and "none" in per_head:
        fixed, none = (_seeds(per_head, k, "probe_h", "shifted") for k in ("fixed", "none"))
        out.append(_better("a fixed re-weighting head is an alternative to the learned head",
                           "probe on h, shifted test", ("fixed", "no head"), fixed, none,
                           "judged against no head"))
    return out


def figures(r, per_head: dict, losses: dict) -> None:
    with r.figure("projection_head.png", 1, 2, figsize=(9, 3.2)) as (_, (ax_loss, ax_rank)):
        for head, curves in losses.items():
            ax_loss.plot(np.stack(curves).mean(0), label=head, lw=1)
            ranks = per_head[head]["summary"]["effective_rank"]
            ax_rank.plot(list(ranks), [kit.mean_of(v) for v in ranks.values()], "o-",
                         label=head)
        ax_loss.set(xlabel="step", ylabel="InfoNCE loss (seed mean)")
        ax_rank.set(xlabel="layer", ylabel="effective rank / width")
        ax_loss.legend()
        ax_rank.legend()


def markdown(config, per_head: dict, timings: dict) -> list[str]:
    d = config.data
    lines = ["# Projection heads (Xue et al., 2024), small", "",
             f"CNN encoder (width {config.model.width}, stem + {config.model.n_layers} "
             f"blocks) trained with InfoNCE for {config.train.steps} steps on {d.n_shapes} "
             f"shapes x textures {tuple(d.textures)} ({d.palette}); linear probes on shape; "
             f"shifted test: textures {tuple(d.shifted_textures)} ({d.shifted_palette}). "
             f"{len(kit.train_seeds(config))} training seeds. Figure: projection_head.png.",
             "", *kit.claims_table(claims(per_head)), ""]
    rows = []
    for head, s in per_head.items():
        m = s["summary"]
        rows.append([head, kit.pm(m["probe_h"]["test"]), kit.pm(m["probe_h"]["shifted"]),
                     kit.pm(m["probe_z"]["test"]), kit.pm(m["probe_z"]["shifted"])])
    lines += kit.table(["head", "probe h", "probe h (shifted)", "probe z",
                        "probe z (shifted)"], rows) + [""]
    ranks = {head: s["summary"]["effective_rank"] for head, s in per_head.items()}
    layers = list(next(iter(ranks.values())))
    lines += kit.table(["head", *layers], [[h, *(f"{kit.mean_of(r[k]):.2f}" for k in layers)]
                                           for h, r in ranks.items()]) + [""]
    lines += [f"Timings: {kit.timings_line(timings)}."]
    return lines
