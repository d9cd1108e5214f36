"""Depth efficiency at small scale (METHODS.md item 3): ``mechinterp run
configs/depth_efficiency.py``.

1. Train (or reuse) a deep and a shallow LLaMA-style decoder on the same synthetic mixture
   (same data, width and steps; ``model.n_layers`` vs ``shallow_layers`` layers).
2. On test examples (all non-padding tokens), for both models:
   :func:`~mechinterp.depth_efficiency.layer_contributions`,
   :func:`~mechinterp.depth_efficiency.skip_effects` and
   :func:`~mechinterp.depth_efficiency.logit_lens`.
3. :func:`~mechinterp.depth_efficiency.residual_map_r2` from the shallow model's stream
   after layer ``i`` to the deep model's after layer ``j`` (held-out tokens).

Writes ``report.md``, ``results.json``, ``contributions.png``, ``skip.png``,
``logit_lens.png`` and ``residual_maps.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from mechinterp import depth_efficiency as de
from mechinterp.experiments.kit import legacy as small_lm  # until ported to the kit


def default_config() -> ml_collections.ConfigDict:
    c = small_lm.base_config()
    c.job = "mechinterp.experiments.depth_efficiency:run"
    c.workdir = "runs/depth_efficiency"
    c.shallow_layers = 3
    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_eval = 256  # test examples
    c.analysis.top_k = 5  # logit lens overlap
    c.analysis.ridge = 1e-3
    return c


PRESETS = {
    "default": {},
    "smoke": {**small_lm.SMOKE, "model.n_layers": 2, "shallow_layers": 1,
              "analysis.n_eval": 24},
}


def analyse(model, params, data, config) -> dict:
    return {
        "metrics": small_lm.lm_metrics(model, params, data),
        "contributions": de.layer_contributions(model, params, data.tokens, data.real),
        "skip": de.skip_effects(model, params, data.tokens, data.real),
        "lens": de.logit_lens(model, params, data.tokens, data.real, k=config.analysis.top_k),
    }


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    config = small_lm.resolve_preset(config, default_config(), PRESETS)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mixture, builder = small_lm.make_data(config, workdir)
    vocab = mixture.tokenizer().vocab_size
    models = {
        "deep": small_lm.train_model(config, builder, vocab, workdir / "deep"),
        "shallow": small_lm.train_model(config, builder, vocab, workdir / "shallow",
                                        n_layers=config.shallow_layers),
    }
    data = small_lm.examples(mixture, "test", config.analysis.n_eval)
    results = {name: analyse(model, params, data, config)
               for name, (model, params, _) in models.items()}
    (shallow, shallow_params, _), (deep, deep_params, _) = models["shallow"], models["deep"]
    r2 = de.residual_map_r2(shallow, shallow_params, deep, deep_params, data.tokens, data.real,
                            ridge=config.analysis.ridge)
    results["residual_map_r2"] = r2
    results["training"] = {name: info for name, (_, _, info) in models.items()}
    results["seconds"] = time.perf_counter() - started
    figures = {"contributions": plot_contributions(workdir / "contributions.png", results),
               "skip": plot_skip(workdir / "skip.png", results),
               "lens": plot_lens(workdir / "logit_lens.png", results),
               "maps": plot_maps(workdir / "residual_maps.png", r2)}
    (workdir / "results.json").write_text(json.dumps(results, indent=2,
                                                     default=small_lm.json_default))
    (workdir / "report.md").write_text(report(config, results, figures, data.task_names))
    return results


def plot_contributions(path: Path, results: dict) -> str:
    fig, axes = small_lm.figure(2, 2, figsize=(10, 6), squeeze=False)
    for col, name in enumerate(("shallow", "deep")):
        c = results[name]["contributions"]
        layers = np.arange(len(c["rel_layer"]))
        ax = axes[0][col]
        for offset, part in zip((-0.27, 0.0, 0.27), ("attn", "mlp", "layer")):
            ax.bar(layers + offset, c[f"rel_{part}"], 0.27, label=f"||{part}|| / ||h||")
        ax.set_yscale("log")  # layer 0 reads the tiny raw embeddings
        ax.set_xticks(layers)
        ax.set_title(f"{name}: relative contribution")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for part in ("attn", "mlp", "layer"):
            ax.plot(layers, c[f"cos_{part}"], "-o", label=f"cos({part}, h)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(layers)
        ax.set_title(f"{name}: cosine with the residual")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    return small_lm.save(fig, path)


def plot_skip(path: Path, results: dict) -> str:
    fig, axes = small_lm.figure(1, 2, figsize=(10, 3.8))
    skip = results["deep"]["skip"]
    im = axes[0].imshow(skip["contribution_change"], cmap="viridis", interpolation="nearest")
    axes[0].set_xlabel("later layer l")
    axes[0].set_ylabel("skipped layer s")
    axes[0].set_title("deep: relative change of layer l's contribution")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    for name in ("shallow", "deep"):
        kl = results[name]["skip"]["output_kl"]
        axes[1].plot(np.arange(len(kl)) / max(len(kl) - 1, 1), kl, "-o", label=name)
    axes[1].set_xlabel("relative depth of the skipped layer")
    axes[1].set_ylabel("KL(full || skipped) of the output")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    return small_lm.save(fig, path)


def plot_lens(path: Path, results: dict) -> str:
    fig, axes = small_lm.figure(1, 2, figsize=(10, 3.4))
    for name in ("shallow", "deep"):
        lens = results[name]["lens"]
        depth = np.arange(len(lens["kl"])) / (len(lens["kl"]) - 1)
        axes[0].plot(depth, lens["kl"], "-o", label=name)
        axes[1].plot(depth, lens["topk_overlap"], "-o", label=name)
    axes[0].set_ylabel("KL(final || lens)")
    axes[1].set_ylabel("top-k overlap with the final output")
    for ax in axes:
        ax.set_xlabel("relative depth (0 = embeddings)")
        ax.legend(fontsize=8)
    return small_lm.save(fig, path)


def plot_maps(path: Path, r2: np.ndarray) -> str:
    fig, ax = small_lm.figure(figsize=(6, 3.6))
    im = ax.imshow(r2, cmap="magma", vmin=min(0.0, float(r2.min())), vmax=1.0, aspect="auto",
                   interpolation="nearest")
    best = r2.argmax(1)
    ax.plot(best, np.arange(len(best)), "c*", markersize=10, label="best deep layer")
    ax.set_xticks(range(r2.shape[1]))
    ax.set_yticks(range(r2.shape[0]))
    ax.set_xlabel("deep model: after layer j (0 = embeddings)")
    ax.set_ylabel("shallow: after layer i")
    ax.set_title("R^2 of ridge maps shallow -> deep (held-out tokens)")
    ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return small_lm.save(fig, path)


def halves(values) -> tuple[float, float]:
    """Means of the first and second half of ``values`` (the middle one goes to neither)."""
    values = np.asarray(values, np.float64)
    n = len(values)
    return float(values[: n // 2].mean()), float(values[(n + 1) // 2:].mean())


def verdicts(results: dict) -> list[str]:
    deep = results["deep"]
    lines = []
    rel = deep["contributions"]["rel_layer"]
    if len(rel) >= 3:
        first, second = halves(rel[1:])
        lines.append(
            f"- Paper: the second half of the layers contributes much less. Deep model, layers "
            f"1..{len(rel) - 1} (layer 0 reads the raw embeddings, whose norm is tiny, so its "
            f"ratio {rel[0]:.1f} says little): mean relative contribution ||a+m||/||h|| "
            f"{first:.3f} (first half) vs {second:.3f} (second half): "
            f"{'less' if second < first else 'not less'} in the second half.")
    change = deep["skip"]["contribution_change"]
    k_first, k_second = halves(deep["skip"]["output_kl"])
    if len(change) >= 3:  # the last layer has no later layers
        first, second = halves([np.nanmean(row) for row in change[:-1]])
        lines.append(
            f"- Paper: skipping a second-half layer barely changes later layers' computation "
            f"and acts mostly on the output. Deep model: mean relative change of later "
            f"contributions {first:.3f} when a layer of the first half is skipped vs "
            f"{second:.3f} for the second half (layers 0..{len(change) - 2}, the middle one "
            f"in neither); output KL {k_first:.3f} vs {k_second:.3f}.")
    lens = deep["lens"]
    top1 = [i for i, v in enumerate(lens["topk_overlap"]) if v >= 0.5]
    lines.append(
        f"- Logit lens (deep): KL to the final output after each layer "
        f"{', '.join(f'{v:.2f}' for v in lens['kl'])}; the top-k overlap first reaches 0.5 "
        f"after layer {top1[0] if top1 else 'never'} of {len(lens['kl']) - 1} (0 = "
        "embeddings). The paper finds the output distribution formed mostly in the second half.")
    r2 = np.asarray(results["residual_map_r2"])
    n_a, n_b = r2.shape[0] - 1, r2.shape[1] - 1
    best = r2.argmax(1)
    gap = np.abs(best / n_b - np.arange(n_a + 1) / n_a).mean()
    lines.append(
        f"- Paper: the best map from a shallow layer lands at the same relative depth of the "
        f"deep model. Best deep layer for shallow layers 0..{n_a}: {best.tolist()} (equal "
        f"relative depth would be {np.round(np.arange(n_a + 1) / n_a * n_b, 1).tolist()}); "
        f"mean relative-depth gap {gap:.2f}. (Row 0 is trivially high: embeddings are a "
        "lookup table over fewer distinct tokens than dimensions.)")
    return lines


def report(config, results: dict, figures: dict, tasks) -> str:
    lines = ["# Depth efficiency at small scale (METHODS.md item 3)", "",
             (f"Preset `{config.preset}`, seed {config.seed}; a {config.model.n_layers}-layer "
              f"and a {config.shallow_layers}-layer decoder (d_model {config.model.d_model}, "
              f"same data and steps) on {', '.join(tasks)}; {config.analysis.n_eval} test "
              f"examples, every non-padding token; total {results['seconds']:.0f} s (deep: "
              f"{small_lm.training_note(results['training']['deep'])}; shallow: "
              f"{small_lm.training_note(results['training']['shallow'])}). Numbers in "
              "`results.json`."), "",
             "| model | layers | loss | exact match |", "|---|---|---|---|"]
    for name in ("shallow", "deep"):
        m = results[name]["metrics"]["all"]
        n = len(results[name]["contributions"]["rel_layer"])
        lines.append(f"| {name} | {n} | {m['loss']:.3f} | {m['exact']:.3f} |")
    lines += ["", "## Contributions", "", f"![contributions]({figures['contributions']})", "",
              ("| model | layer | ‖a+m‖/‖h‖ | ‖a‖/‖h‖ | ‖m‖/‖h‖ | cos(a+m, h) | "
              "cos(a, h) | cos(m, h) |"), "|---|---|---|---|---|---|---|---|"]
    for name in ("shallow", "deep"):
        c = results[name]["contributions"]
        for layer in range(len(c["rel_layer"])):
            lines.append(f"| {name} | {layer} | " + " | ".join(
                f"{c[k][layer]:.3f}" for k in ("rel_layer", "rel_attn", "rel_mlp", "cos_layer",
                                                "cos_attn", "cos_mlp")) + " |")
    lines += ["", "## Skipping a layer", "", f"![skip]({figures['skip']})", "",
              ("Deep model, rows = skipped layer s, columns = later layer l: mean relative "
              "change of l's contribution; then output KL and top-1 agreement."), ""]
    change = results["deep"]["skip"]["contribution_change"]
    lines += ["| s | " + " | ".join(f"l={i}" for i in range(len(change))) + " | output KL | "
              "top-1 agreement |", "|---" * (len(change) + 3) + "|"]
    for s, row in enumerate(change):
        cells = " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in row)
        lines.append(f"| {s} | {cells} | {results['deep']['skip']['output_kl'][s]:.3f} | "
                     f"{results['deep']['skip']['top1_agreement'][s]:.3f} |")
    lines += ["", "## Logit lens", "", f"![lens]({figures['lens']})", "",
              "## Residual maps shallow -> deep", "", f"![maps]({figures['maps']})", "",
              "## Against the paper's claims", "", *verdicts(results), "",
              ("Caveats: tiny models (a few layers) trained for minutes on synthetic tasks, one "
               "seed; the paper studies 1-70B models on natural text. The skip measure here "
               "is the mean relative change over tokens (the paper reports maxima)."), ""]
    return "\n".join(lines)
