"""report.md and the figure of the OT-fusion reproduction."""

from __future__ import annotations

from mechinterp.experiments import kit

NAMES = {"parent_a": "parent A", "parent_b": "parent B", "vanilla": "vanilla average",
         "ot_exact": "OT fusion, exact (hard)", "ot_sinkhorn": "OT fusion, Sinkhorn (soft)"}
METRIC = {"vit": "test accuracy (digits)", "decoder": "copy accuracy (2nd half)"}


def _acc(results, family, stage, name):
    return results[family]["summary"][stage][name]["accuracy"]


def _per_seed(results, family, stage, test) -> int:
    return sum(bool(test(s[stage])) for s in results[family]["per_seed"])


def claims(results: dict) -> list[kit.Claim]:
    out = []
    for family, res in results.items():
        n = len(res["per_seed"])
        acc = {k: _acc(results, family, "one_shot", k) for k in NAMES}
        best_ot = max(("ot_exact", "ot_sinkhorn"), key=lambda k: kit.mean_of(acc[k]))
        k = _per_seed(results, family, "one_shot",
                      lambda s: s[best_ot]["accuracy"] > s["vanilla"]["accuracy"])
        out.append(kit.Claim(
            f"{family}: one-shot OT fusion beats vanilla averaging by a large margin",
            f"{NAMES[best_ot]} {kit.pm(acc[best_ot])} vs vanilla {kit.pm(acc['vanilla'])}",
            k == n, f"higher in {k}/{n} seeds"))
        k = _per_seed(results, family, "one_shot",
                      lambda s: s["ot_sinkhorn"]["loss"] < s["ot_exact"]["loss"])
        out.append(kit.Claim(
            f"{family}: soft alignment (Sinkhorn) fuses transformers better than hard",
            f"loss soft {kit.pm(results[family]['summary']['one_shot']['ot_sinkhorn']['loss'])}"
            f" vs hard {kit.pm(results[family]['summary']['one_shot']['ot_exact']['loss'])}",
            k == n, f"lower test loss in {k}/{n} seeds"))
        tuned = {k: _acc(results, family, "finetuned", k) for k in ("parent_b", best_ot,
                                                                     "vanilla")}
        k = _per_seed(results, family, "finetuned", lambda s: s[best_ot]["loss"] < min(
            s["vanilla"]["loss"], s["parent_b"]["loss"]))
        out.append(kit.Claim(
            f"{family}: after a short fine-tune the OT-fused model beats vanilla fusion and "
            "the parents",
            f"fine-tuned {NAMES[best_ot]} {kit.pm(tuned[best_ot])}, vanilla "
            f"{kit.pm(tuned['vanilla'])}, parent B {kit.pm(tuned['parent_b'])}; parents "
            f"before: {kit.pm(acc['parent_a'])}, {kit.pm(acc['parent_b'])}",
            k == n, f"lowest test loss in {k}/{n} seeds (parent B fine-tuned as much)"))
    return out


def figure(r, results: dict) -> None:
    families = list(results)
    with r.figure("ot_fusion.png", 1, len(families), figsize=(4.5 * len(families), 3.2),
                  squeeze=False) as (_, axes):
        for ax, family in zip(axes[0], families):
            s = results[family]["summary"]
            names = list(NAMES)
            xs = range(len(names))
            for stage, dx in (("one_shot", -0.2), ("finetuned", 0.2)):
                vals = [kit.mean_of(s[stage][k]["accuracy"]) if k in s[stage] else 0.0
                        for k in names]
                ax.bar([x + dx for x in xs], vals, 0.4, label=stage.replace("_", "-"))
            ax.set_xticks(list(xs), ["A", "B", "vanilla", "OT hard", "OT soft"])
            ax.set(title=family, ylabel=METRIC[family], ylim=(0, 1))
            ax.legend()


def markdown(config, results: dict, timings: dict) -> list[str]:
    lines = ["# Transformer fusion with optimal transport (Imfeld et al., 2024), small", "",
             f"{config.seeds} seeds; each seed trains two parents independently. "
             f"Timings: {kit.timings_line(timings)}.", "", *kit.claims_table(claims(results)),
             ""]
    for family, res in results.items():
        s = res["summary"]
        lines += [f"## {family}: {METRIC[family]} and test loss", ""]
        rows = []
        for k, name in NAMES.items():
            tuned = s["finetuned"].get(k)
            rows.append((name, kit.pm(s["one_shot"][k]["accuracy"], ".3f"),
                         kit.pm(s["one_shot"][k]["loss"], ".3f"),
                         kit.pm(tuned["accuracy"], ".3f") if tuned else "-",
                         kit.pm(tuned["loss"], ".3f") if tuned else "-"))
        lines += kit.table(["model", "accuracy", "loss", f"accuracy after "
                            f"{config.finetune.steps} steps", "loss after"], rows) + [""]
    lines += [
        "## What is simplified, inferred or synthetic", "",
        "- Tiny models (2 layers, d_model 32) on 8x8 digits and a synthetic copy task, not "
        "ViTs on CIFAR/ImageNet or BERT; parents share the architecture and width (the "
        "paper also fuses different widths: not built here).",
        "- Maps come from activations on training inputs (the paper's activation-based "
        f"variant; {config.align_examples} inputs); Sinkhorn epsilon {config.epsilon} "
        "relative to the mean cost; uniform marginals.",
        "- Heads move as wholes (head map from summed within-head costs); the decoder's "
        "Q/K within-head map is the identity because RoPE pins each dimension's "
        "frequency; the residual map after each sublayer is the plain average of the "
        "incoming and the sublayer's map.",
        "- Fine-tuning: the same Adam steps and learning rate for every fused model and for "
        "parent B, so 'beats the parents' compares equal extra training.",
        "", "![fusion](ot_fusion.png)"]
    return lines
