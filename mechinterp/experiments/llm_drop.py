"""LLM-Drop at small scale (METHODS.md item 4): ``mechinterp run configs/llm_drop.py``.

1. Train (or reuse) a 6-layer LLaMA-style decoder on a synthetic mixture (fact recall and
   in-context chains, :mod:`mechinterp.train.tasks`).
2. Score every attention sublayer, MLP sublayer and block on a calibration set of training
   prompts (:func:`mechinterp.llm_drop.similarity_scores`, all non-padding tokens).
3. For each variant (attention, MLP, block, joint) and mode (one-shot, iterative), the drop
   order (:func:`~mechinterp.llm_drop.drop_order`), and the test loss / accuracy after
   dropping the first ``k`` for every ``k``. Curves are evaluated with the dropped
   sublayers zeroed in the full model (one compilation); at ``k`` = half of each
   variant's sublayers the genuinely smaller model from :func:`~mechinterp.llm_drop.drop`
   is built, checked to give the same logits, and timed against the full model (both with
   unrolled layers, the same batch, best of ``analysis.timing_repeats``).

Writes ``report.md``, ``results.json``, ``scores.png`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mechinterp import llm_drop
from mechinterp.site_io import intervene, list_sites
from mechinterp.experiments.kit import legacy as small_lm  # until ported to the kit

MODES = ("one-shot", "iterative")


def default_config() -> ml_collections.ConfigDict:
    c = small_lm.base_config()
    c.job = "mechinterp.experiments.llm_drop:run"
    c.workdir = "runs/llm_drop"
    c.analysis = ml_collections.ConfigDict()
    c.analysis.n_calibration = 128  # training prompts scored
    c.analysis.n_eval = 256  # test examples for loss / accuracy
    c.analysis.timing_repeats = 10
    return c


PRESETS = {
    "default": {},
    "smoke": {**small_lm.SMOKE, "model.n_layers": 2, "analysis.n_calibration": 8,
              "analysis.n_eval": 32, "analysis.timing_repeats": 2},
}


def max_drops(variant: str, n_layers: int) -> int:
    """The most sublayers a variant may drop and still leave a layer."""
    return {"attn": n_layers, "mlp": n_layers, "block": n_layers - 1,
            "joint": 2 * n_layers - 1}[variant]


def best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``fn()`` (after one warm-up run), in seconds."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def unrolled(model, params):
    """The same model with unrolled layers (the layout every non-uniform drop has)."""
    from mechinterp.models.decoder import unstack_layers

    if not model.config.scan_layers:
        return model, params
    config = dataclasses.replace(model.config, scan_layers=False)
    return type(model)(config), unstack_layers(params, config.n_layers)


def n_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    config = small_lm.resolve_preset(config, default_config(), PRESETS)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    a = config.analysis
    mixture, builder = small_lm.make_data(config, workdir)
    model, params, info = small_lm.train_model(config, builder, mixture.tokenizer().vocab_size,
                                               workdir)
    n_layers = model.config.n_layers
    calib = small_lm.examples(mixture, "train", a.n_calibration)
    data = small_lm.examples(mixture, "test", a.n_eval)
    tokens = jnp.asarray(data.tokens)
    sites = list_sites(model, tokens)

    def metrics_without(sublayers):
        logits = intervene(model, params, tokens, interventions=llm_drop.zeroing_interventions(
            sites, sublayers))
        return small_lm.metrics_from_logits(logits, data)

    scores = llm_drop.similarity_scores(model, params, calib.tokens, calib.real)
    curves, orders = {}, {}
    for variant in llm_drop.VARIANTS:
        for mode in MODES:
            order = llm_drop.drop_order(model, params, calib.tokens, calib.real,
                                        variant=variant, n=max_drops(variant, n_layers),
                                        iterative=mode == "iterative")
            orders[f"{variant}/{mode}"] = order
            curves[f"{variant}/{mode}"] = [
                metrics_without([s for s, _ in order[:k]]) for k in range(len(order) + 1)]

    full_model, full_params = unrolled(model, params)
    full_apply = jax.jit(lambda p: full_model.apply({"params": p}, tokens))
    dropped = {}
    for variant in llm_drop.VARIANTS:
        k = n_layers if variant == "joint" else max(1, n_layers // 2)
        chosen = [s for s, _ in orders[f"{variant}/one-shot"][:k]]
        small, small_params = llm_drop.drop(model, params, chosen)
        apply = jax.jit(lambda p, small=small: small.apply({"params": p}, tokens))
        zeroed = intervene(model, params, tokens,
                           interventions=llm_drop.zeroing_interventions(sites, chosen))
        dropped[variant] = {
            "k": k, "dropped": [str(s) for s in chosen],
            "n_layers": small.config.n_layers, "attn_layers": small.config.attn_layers,
            "mlp_layers": small.config.mlp_layers,
            "params": n_params(small_params), "full_params": n_params(params),
            "max_abs_logit_diff_vs_zeroed": float(jnp.abs(apply(small_params) - zeroed).max()),
            # timed back to back, so both see the same machine load
            "full_seconds": best_time(lambda: full_apply(full_params), a.timing_repeats),
            "seconds": best_time(lambda apply=apply, p=small_params: apply(p), a.timing_repeats),
            "metrics": small_lm.metrics_from_logits(apply(small_params), data),
        }
        dropped[variant]["speedup"] = (dropped[variant]["full_seconds"]
                                       / dropped[variant]["seconds"])

    results = {"training": info, "scores": {k: v.tolist() for k, v in scores.items()},
               "orders": {name: [(str(s), score) for s, score in order]
                          for name, order in orders.items()},
               "curves": curves, "dropped_half": dropped, "task_names": data.task_names,
               "seconds": time.perf_counter() - started}
    figures = [plot_scores(workdir / "scores.png", scores),
               plot_curves(workdir / "curves.png", curves)]
    (workdir / "results.json").write_text(json.dumps(results, indent=2,
                                                     default=small_lm.json_default))
    (workdir / "report.md").write_text(report(config, results, figures))
    return results


def plot_scores(path: Path, scores: dict) -> str:
    fig, ax = small_lm.figure(figsize=(6, 3.2))
    layers = np.arange(len(scores["attn"]))
    for offset, kind in zip((-0.27, 0.0, 0.27), llm_drop.KINDS):
        ax.bar(layers + offset, 1 - np.asarray(scores[kind]), 0.27, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("importance 1 - S")
    ax.set_yscale("log")
    ax.set_title("LLM-Drop importance (lower = more droppable)")
    ax.legend(fontsize=8)
    return small_lm.save(fig, path)


def plot_curves(path: Path, curves: dict) -> str:
    fig, axes = small_lm.figure(1, 2, figsize=(10, 3.6))
    for name, points in curves.items():
        _variant, mode = name.split("/")
        style = "-o" if mode == "one-shot" else "--x"
        k = np.arange(len(points))
        axes[0].plot(k, [p["all"]["loss"] for p in points], style, label=name, markersize=3)
        axes[1].plot(k, [p["all"]["exact"] for p in points], style, label=name, markersize=3)
    axes[0].set_ylabel("test loss (targets)")
    axes[1].set_ylabel("test accuracy (exact match)")
    for ax in axes:
        ax.set_xlabel("sublayers dropped")
    axes[1].legend(fontsize=7)
    return small_lm.save(fig, path)


def report(config, results: dict, figures: list[str]) -> str:
    scores = {k: np.asarray(v) for k, v in results["scores"].items()}
    n_layers = len(scores["attn"])
    curves, half = results["curves"], results["dropped_half"]
    base = curves["attn/one-shot"][0]["all"]
    tasks = results["task_names"]
    lines = [
        "# LLM-Drop at small scale (METHODS.md item 4)", "",
        (f"Preset `{config.preset}`, seed {config.seed}; a {n_layers}-layer decoder "
        f"(d_model {config.model.d_model}) trained {results['training']['step']} steps on "
        f"{', '.join(tasks)}; total {results['seconds']:.0f} s "
        f"({small_lm.training_note(results['training'])}). Scores on "
        f"{config.analysis.n_calibration} training prompts, metrics on "
        f"{config.analysis.n_eval} test examples (teacher-forced; exact = every target token "
        "right). Numbers in `results.json`."), "",
        f"Unpruned: loss {base['loss']:.3f}, exact match {base['exact']:.3f} (" + ", ".join(
            f"{t} {curves['attn/one-shot'][0][t]['exact']:.3f}" for t in tasks
            if t in curves["attn/one-shot"][0]) + ").", "",
        "## Similarity scores S = mean cos(X, X + f(norm X))", "",
        f"![scores]({figures[0]})", "", "| layer | attention | MLP | block |", "|---|---|---|---|"]
    for layer in range(n_layers):
        lines.append(f"| {layer} | {scores['attn'][layer]:.5f} | {scores['mlp'][layer]:.5f} | "
                     f"{scores['block'][layer]:.5f} |")
    lines += ["", "## Loss and accuracy vs number dropped", "", f"![curves]({figures[1]})", "",
              ("| variant / mode | order (first dropped first) | exact match after k = 0, 1, "
              "2, ... |"), "|---|---|---|"]
    for name, points in curves.items():
        order = ", ".join(s for s, _ in results["orders"][name])
        accs = " ".join(f"{p['all']['exact']:.2f}" for p in points)
        lines.append(f"| {name} | {order} | {accs} |")
    lines += ["", "## Genuinely dropped models (half of each variant, one-shot order)", "",
              ("Built by `mechinterp.llm_drop.drop` (parameters removed, config lists the kept "
              "sublayers); timed back to back with the full model, both unrolled, same batch "
              f"({config.analysis.n_eval} x {config.data.seq_len} tokens), best of "
              f"{config.analysis.timing_repeats} on this CPU."), "",
              ("| variant | dropped | layers left | params (full) | exact match | loss | "
              "speedup | max abs logit diff vs zeroing |"), "|---|---|---|---|---|---|---|---|"]
    for variant, d in half.items():
        lines.append(
            f"| {variant} | {', '.join(d['dropped'])} | {d['n_layers']} | {d['params']} "
            f"({d['full_params']}) | {d['metrics']['all']['exact']:.3f} | "
            f"{d['metrics']['all']['loss']:.3f} | {d['speedup']:.2f}x | "
            f"{d['max_abs_logit_diff_vs_zeroed']:.1e} |")
    lines += ["", "## Against the paper's claims", "", *verdicts(scores, curves, half), "",
              ("Caveats: one small model trained for minutes on synthetic tasks, one seed; "
              "CPU timings of a tiny model are dominated by per-op overhead, not FLOPs, so "
              "speedups here say little about large models on accelerators."), ""]
    return "\n".join(lines)


def verdicts(scores: dict, curves: dict, half: dict) -> list[str]:
    n_layers = len(scores["attn"])
    lines = []
    more = int((scores["attn"] > scores["mlp"]).sum())
    lines.append(
        f"- Paper: attention layers are more redundant than MLP layers (higher S). Here "
        f"attention has the higher score in {more} of {n_layers} layers (mean S attention "
        f"{scores['attn'].mean():.4f}, MLP {scores['mlp'].mean():.4f}).")
    second = scores["attn"][n_layers // 2:].mean() > scores["attn"][:n_layers // 2].mean()
    lines.append(
        f"- Paper: deeper attention layers are the most droppable. Here the second half's "
        f"attention S is {'higher' if second else 'not higher'} than the first half's "
        f"({scores['attn'][n_layers // 2:].mean():.4f} vs "
        f"{scores['attn'][:n_layers // 2].mean():.4f}).")
    base = curves["attn/one-shot"][0]["all"]["exact"]
    k = half["attn"]["k"]
    for variant in ("attn", "mlp", "block"):
        acc = curves[f"{variant}/one-shot"][k]["all"]["exact"]
        lines.append(f"- Dropping {k} {variant} sublayer(s) one-shot: exact match {base:.3f} -> "
                     f"{acc:.3f} ({acc - base:+.3f}); genuinely dropped model "
                     f"{half[variant]['speedup']:.2f}x the full model's speed.")
    lines.append("- Paper (Llama-2-70B): dropping half the attention layers costs 2.4% and runs "
                 "48.4% faster. Compare the attention row above.")
    gaps = [abs(curves[f"{v}/one-shot"][j]["all"]["exact"]
                - curves[f"{v}/iterative"][j]["all"]["exact"])
            for v in llm_drop.VARIANTS for j in range(len(curves[f"{v}/one-shot"]))]
    lines.append(f"- Paper: iterative dropping is about as good as one-shot. Here the largest "
                 f"accuracy gap between the two at equal k is {max(gaps):.3f}.")
    return lines
