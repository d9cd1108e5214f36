"""Depth efficiency at small scale (METHODS.md item 3): ``mechinterp run
configs/depth_efficiency.py``.

Per training seed: train a deep and a shallow LLaMA-style decoder on the same mixture;
measure layer contributions, skip effects and the logit lens of both
(:mod:`mechinterp.depth_efficiency`), and ridge maps from the shallow model's residual
stream to the deep model's. Procedure and outputs: docs/experiments.md.
"""

from __future__ import annotations

import numpy as np

from mechinterp import depth_efficiency as de
from mechinterp.experiments import kit
from mechinterp.experiments.kit import lm

MODELS = ("shallow", "deep")


def lists(tree):
    """Arrays in ``tree`` as (nested) lists, so seeds aggregate element-wise."""
    if isinstance(tree, dict):
        return {k: lists(v) for k, v in tree.items()}
    return np.asarray(tree).tolist() if isinstance(tree, np.ndarray) else tree


def analyse(model, params, data: lm.Examples, config) -> dict:
    return lists({
        "metrics": lm.lm_metrics(model, params, data),
        "contributions": de.layer_contributions(model, params, data.tokens, data.real),
        "skip": de.skip_effects(model, params, data.tokens, data.real),
        "lens": de.logit_lens(model, params, data.tokens, data.real, k=config.analysis.top_k),
    })


@kit.job
def run(config, workdir) -> dict:
    with kit.Run(config, workdir) as r:
        seeds = kit.train_seeds(config)
        with r.phase("data"):
            mixture, builder = lm.make_data(config, r.workdir)
            data = lm.examples(mixture, "test", config.analysis.n_eval)
        vocab = mixture.tokenizer().vocab_size
        layers = {"deep": config.model.n_layers, "shallow": config.shallow_layers}
        per_seed = []
        for seed in seeds:
            with r.phase("train"):
                trained = {name: lm.train_decoder(
                    config, "llama", builder, vocab, r.workdir / "models" / name / f"seed{seed}",
                    seed=seed, model={"n_layers": layers[name]}) for name in ("deep", "shallow")}
            with r.phase("analyse"):
                result = {"seed": seed, **{name: analyse(t.model, t.params, data, config)
                                           for name, t in trained.items()}}
                s, d = trained["shallow"], trained["deep"]
                result["residual_map_r2"] = de.residual_map_r2(
                    s.model, s.params, d.model, d.params, data.tokens, data.real,
                    ridge=config.analysis.ridge).tolist()
                result["training"] = {name: t.info for name, t in trained.items()}
                per_seed.append(result)
        results = {"seeds": seeds, "task_names": data.task_names, "per_seed": per_seed,
                   "headline": kit.aggregate([headline(s) for s in per_seed])}
        with r.phase("report"):
            mean = seed_means(per_seed)
            plot_contributions(r, mean)
            plot_skip(r, mean)
            plot_lens(r, mean)
            plot_maps(r, np.asarray(mean["residual_map_r2"]))
            r.write_results(results)
            r.write_report(report(config, results, mean, r.timings))
        return results


def seed_means(per_seed: list) -> dict:
    """The per-seed results' numbers averaged over seeds (NaN cells stay NaN)."""
    def mean(values):
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        return np.mean(np.asarray(values, np.float64), axis=0)
    return mean([{k: s[k] for k in (*MODELS, "residual_map_r2")} for s in per_seed])


def plot_contributions(r: kit.Run, mean: dict) -> None:
    with r.figure("contributions.png", 2, 2, figsize=(10, 6), squeeze=False) as (_, axes):
        for col, name in enumerate(MODELS):
            c = mean[name]["contributions"]
            layers = np.arange(len(c["rel_layer"]))
            ax = axes[0][col]
            for offset, part in zip((-0.27, 0.0, 0.27), ("attn", "mlp", "layer")):
                ax.bar(layers + offset, c[f"rel_{part}"], 0.27, label=f"||{part}|| / ||h||")
            ax.set_yscale("log")  # layer 0 reads the tiny raw embeddings
            ax.set_xticks(layers)
            ax.set_title(f"{name}: relative contribution")
            ax.legend()
            ax = axes[1][col]
            for part in ("attn", "mlp", "layer"):
                ax.plot(layers, c[f"cos_{part}"], "-o", label=f"cos({part}, h)")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xticks(layers)
            ax.set_title(f"{name}: cosine with the residual")
            ax.set_xlabel("layer")
            ax.legend()


def plot_skip(r: kit.Run, mean: dict) -> None:
    with r.figure("skip.png", 1, 2, figsize=(10, 3.8)) as (fig, axes):
        im = axes[0].imshow(mean["deep"]["skip"]["contribution_change"], cmap="viridis",
                            interpolation="nearest")
        axes[0].set_xlabel("later layer l")
        axes[0].set_ylabel("skipped layer s")
        axes[0].set_title("deep: relative change of layer l's contribution")
        fig.colorbar(im, ax=axes[0], fraction=0.046)
        for name in MODELS:
            kl = mean[name]["skip"]["output_kl"]
            axes[1].plot(np.arange(len(kl)) / max(len(kl) - 1, 1), kl, "-o", label=name)
        axes[1].set_xlabel("relative depth of the skipped layer")
        axes[1].set_ylabel("KL(full || skipped) of the output")
        axes[1].set_yscale("log")
        axes[1].legend()


def plot_lens(r: kit.Run, mean: dict) -> None:
    with r.figure("logit_lens.png", 1, 2, figsize=(10, 3.4)) as (_, axes):
        for name in MODELS:
            lens = mean[name]["lens"]
            depth = np.arange(len(lens["kl"])) / (len(lens["kl"]) - 1)
            axes[0].plot(depth, lens["kl"], "-o", label=name)
            axes[1].plot(depth, lens["topk_overlap"], "-o", label=name)
        axes[0].set_ylabel("KL(final || lens)")
        axes[1].set_ylabel("top-k overlap with the final output")
        for ax in axes:
            ax.set_xlabel("relative depth (0 = embeddings)")
            ax.legend()


def plot_maps(r: kit.Run, r2: np.ndarray) -> None:
    with r.figure("residual_maps.png", figsize=(6, 3.6)) as (fig, ax):
        im = ax.imshow(r2, cmap="magma", vmin=min(0.0, float(r2.min())), vmax=1.0,
                       aspect="auto", interpolation="nearest")
        best = r2.argmax(1)
        ax.plot(best, np.arange(len(best)), "c*", markersize=10, label="best deep layer")
        ax.set_xticks(range(r2.shape[1]))
        ax.set_yticks(range(r2.shape[0]))
        ax.set_xlabel("deep model: after layer j (0 = embeddings)")
        ax.set_ylabel("shallow: after layer i")
        ax.set_title("R^2 of ridge maps shallow -> deep (held-out tokens)")
        ax.legend(loc="lower right")
        fig.colorbar(im, ax=ax, fraction=0.046)


def halves(values) -> list[float]:
    """Means of the first and second half of ``values`` (the middle one goes to neither)."""
    values = np.asarray(values, np.float64)
    n = len(values)
    return [float(values[: n // 2].mean()), float(values[(n + 1) // 2:].mean())]


def headline(result: dict) -> dict:
    """The numbers the claims table compares, of one seed (deep model unless named)."""
    deep = result["deep"]
    rel, change = deep["contributions"]["rel_layer"], deep["skip"]["contribution_change"]
    reached = [i for i, v in enumerate(deep["lens"]["topk_overlap"]) if v >= 0.5]
    r2 = np.asarray(result["residual_map_r2"])
    n_a, n_b = r2.shape[0] - 1, r2.shape[1] - 1
    best = r2.argmax(1)
    h = {name: {k: result[name]["metrics"]["all"][k] for k in ("loss", "exact")}
         for name in MODELS}
    # layer 0 reads the raw embeddings, whose norm is tiny: its ratio says little
    h["contribution_halves"] = halves(rel[1:]) if len(rel) >= 3 else None
    # the last layer has no later layers
    h["skip_change_halves"] = (halves([np.nanmean(row) for row in change[:-1]])
                               if len(change) >= 3 else None)
    h["skip_kl_halves"] = halves(deep["skip"]["output_kl"])
    h["lens_overlap_layer"] = float(reached[0]) if reached else float("nan")
    h["best_deep_layer"] = best.tolist()
    h["relative_depth_gap"] = float(np.abs(best / n_b - np.arange(n_a + 1) / n_a).mean())
    return h


def claims(h: dict, n_deep: int, n_shallow: int, k: int) -> list[kit.Claim]:
    m, out = kit.mean_of, []
    if h["contribution_halves"] is None:
        out.append(kit.Claim("The second half of the layers contributes much less",
                             "needs >= 3 deep layers", None))
    else:
        first, second = h["contribution_halves"]
        out.append(kit.Claim(
            "The second half of the layers contributes much less",
            f"mean ||a+m||/||h|| of layers 1..{n_deep - 1}: {kit.pm(first, '.3f')} (first "
            f"half) vs {kit.pm(second, '.3f')} (second half)", m(second) < m(first),
            "test: seed means, second < first; layer 0 left out, it reads the tiny embeddings"))
    k_first, k_second = h["skip_kl_halves"]
    if h["skip_change_halves"] is None:
        out.append(kit.Claim("Skipping a second-half layer barely changes later layers' "
                             "computation", "needs >= 3 deep layers", None))
    else:
        first, second = h["skip_change_halves"]
        out.append(kit.Claim(
            "Skipping a second-half layer barely changes later layers' computation and acts "
            "mostly on the output",
            f"mean relative change of later contributions {kit.pm(first, '.3f')} (first-half "
            f"layer skipped) vs {kit.pm(second, '.3f')} (second half); output KL "
            f"{kit.pm(k_first, '.3f')} vs {kit.pm(k_second, '.3f')}", m(second) < m(first),
            "test: seed-mean change, second < first; means over tokens, the paper reports "
            "maxima"))
    layer = m(h["lens_overlap_layer"])
    out.append(kit.Claim(
        "The output distribution is formed mostly in the second half (logit lens)",
        f"top-{k} overlap with the output first reaches 0.5 after layer "
        f"{kit.pm(h['lens_overlap_layer'], '.3g')} of {n_deep} (0 = embeddings)",
        bool(layer > n_deep / 2), "test: seed mean past half the depth; nan = never"))
    gap = m(h["relative_depth_gap"])
    out.append(kit.Claim(
        "The best map from a shallow layer lands at the same relative depth of the deep model",
        f"best deep layer for shallow layers 0..{n_shallow}: "
        f"{[round(m(b), 2) for b in h['best_deep_layer']]} (equal relative depth: "
        f"{np.round(np.arange(n_shallow + 1) / n_shallow * n_deep, 1).tolist()}); mean "
        f"relative-depth gap {kit.pm(h['relative_depth_gap'], '.2f')}", gap <= 0.15,
        "test: seed-mean gap <= 0.15; row 0 is trivially high, embeddings being a lookup table"))
    return out


def report(config, results: dict, mean: dict, timings: dict) -> str:
    per_seed, h, tasks = results["per_seed"], results["headline"], results["task_names"]
    n = {name: len(mean[name]["contributions"]["rel_layer"]) for name in MODELS}
    notes = "; ".join(f"seed {s['seed']} {name}: {kit.training_note(s['training'][name])}"
                      for s in per_seed for name in ("deep", "shallow"))
    lines = ["# Depth efficiency at small scale (METHODS.md item 3)", "",
             (f"Preset `{config.preset}`, training seeds {results['seeds']} (data seed "
              f"{config.seed}); a {n['deep']}-layer and a {n['shallow']}-layer decoder per "
              f"seed (d_model {config.model.d_model}, same data and steps) on "
              f"{', '.join(tasks)}; {config.analysis.n_eval} test examples, every non-padding "
              f"token; {kit.timings_line(timings)} ({notes}). Tables and figures are means "
              "over seeds; per-seed numbers in `results.json`."), "",
             "## Against the paper's claims", "",
             *kit.claims_table(claims(h, n["deep"], n["shallow"], config.analysis.top_k)), "",
             *kit.table(["model", "layers", "loss", "exact match"], [
                 [name, n[name], kit.pm(h[name]["loss"], ".3f"),
                  kit.pm(h[name]["exact"], ".3f")] for name in MODELS]),
             "", "## Contributions", "", "![contributions](contributions.png)", "",
             *kit.table(["model", "layer", "‖a+m‖/‖h‖", "‖a‖/‖h‖", "‖m‖/‖h‖", "cos(a+m, h)",
                         "cos(a, h)", "cos(m, h)"], [
                 [name, layer] + [f"{mean[name]['contributions'][k][layer]:.3f}" for k in (
                     "rel_layer", "rel_attn", "rel_mlp", "cos_layer", "cos_attn", "cos_mlp")]
                 for name in MODELS for layer in range(n[name])]),
             "", "## Skipping a layer", "", "![skip](skip.png)", "",
             ("Deep model, rows = skipped layer s, columns = later layer l: mean relative "
              "change of l's contribution; then output KL and top-1 agreement."), ""]
    skip = mean["deep"]["skip"]
    lines += kit.table(["s"] + [f"l={i}" for i in range(n["deep"])]
                       + ["output KL", "top-1 agreement"], [
        [s] + ["" if np.isnan(v) else f"{v:.3f}" for v in row]
        + [f"{skip['output_kl'][s]:.3f}", f"{skip['top1_agreement'][s]:.3f}"]
        for s, row in enumerate(skip["contribution_change"])])
    lens = mean["deep"]["lens"]
    lines += ["", "## Logit lens", "", "![lens](logit_lens.png)", "",
              f"Deep model, KL to the final output after each layer (0 = embeddings): "
              f"{', '.join(f'{v:.2f}' for v in lens['kl'])}.", "",
              "## Residual maps shallow -> deep", "", "![maps](residual_maps.png)", "",
              ("Caveats: tiny models (a few layers) trained for minutes on synthetic tasks; the "
               "paper studies 1-70B models on natural text."), ""]
    return "\n".join(lines)
