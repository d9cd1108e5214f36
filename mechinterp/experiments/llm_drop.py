"""LLM-Drop at small scale (METHODS.md item 4): ``mechinterp run configs/llm_drop.py``.

Per training seed: train a LLaMA-style decoder; score every attention sublayer, MLP
sublayer and block by input/output similarity (:mod:`mechinterp.llm_drop`); drop them
one-shot and iteratively in score order and measure test loss / accuracy at every count;
at half of each variant's sublayers build the genuinely smaller model, check its logits
and time it. Procedure and outputs: docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import llm_drop
from mechinterp.site_io import intervene, list_sites
from mechinterp.experiments import kit
from mechinterp.experiments.kit import lm

MODES = ("one-shot", "iterative")


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


def analyse(model, params, calib: lm.Examples, data: lm.Examples, a) -> dict:
    """Scores, drop orders, curves and the genuinely dropped models of one trained model."""
    n_layers = model.config.n_layers
    tokens = jnp.asarray(data.tokens)
    sites = list_sites(model, tokens)

    def metrics_without(sublayers):
        logits = intervene(model, params, tokens, interventions=llm_drop.zeroing_interventions(
            sites, sublayers))
        return lm.metrics_from_logits(logits, data)

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
        logits = apply(small_params)
        d = dropped[variant] = {
            "k": k, "dropped": [str(s) for s in chosen],
            "n_layers": small.config.n_layers, "attn_layers": small.config.attn_layers,
            "mlp_layers": small.config.mlp_layers,
            "params": n_params(small_params), "full_params": n_params(params),
            "max_abs_logit_diff_vs_zeroed": float(jnp.abs(logits - zeroed).max()),
            # timed back to back, so both see the same machine load
            "full_seconds": best_time(lambda: full_apply(full_params), a.timing_repeats),
            "seconds": best_time(lambda apply=apply, p=small_params: apply(p), a.timing_repeats),
            "metrics": lm.metrics_from_logits(logits, data),
        }
        d["speedup"] = d["full_seconds"] / d["seconds"]
    return {"scores": {k: v.tolist() for k, v in scores.items()},
            "orders": {name: [(str(s), score) for s, score in order]
                       for name, order in orders.items()},
            "curves": curves, "dropped_half": dropped}


def headline(result: dict) -> dict:
    """The numbers the claims table compares, of one seed."""
    scores = {k: np.asarray(v) for k, v in result["scores"].items()}
    curves, half = result["curves"], result["dropped_half"]
    n = len(scores["attn"])
    k = half["attn"]["k"]
    base = curves["attn/one-shot"][0]["all"]
    gaps = [abs(curves[f"{v}/one-shot"][j]["all"]["exact"]
                - curves[f"{v}/iterative"][j]["all"]["exact"])
            for v in llm_drop.VARIANTS for j in range(len(curves[f"{v}/one-shot"]))]
    return {
        "exact": base["exact"], "loss": base["loss"],
        "attn_above_mlp": int((scores["attn"] > scores["mlp"]).sum()),
        "mean_s": {kind: float(scores[kind].mean()) for kind in llm_drop.KINDS},
        "attn_s_halves": [float(scores["attn"][:n // 2].mean()),
                          float(scores["attn"][n // 2:].mean())],
        "exact_after_half": {v: curves[f"{v}/one-shot"][k]["all"]["exact"]
                             for v in ("attn", "mlp", "block")},
        "speedup": {v: half[v]["speedup"] for v in llm_drop.VARIANTS},
        "max_iterative_gap": max(gaps),
    }


@kit.job
def run(config, workdir) -> dict:
    with kit.Run(config, workdir) as r:
        a, seeds = config.analysis, kit.train_seeds(config)
        with r.phase("data"):
            mixture, builder = lm.make_data(config, r.workdir)
            calib = lm.examples(mixture, "train", a.n_calibration)
            data = lm.examples(mixture, "test", a.n_eval)
        per_seed = []
        for seed in seeds:
            with r.phase("train"):
                trained = lm.train_decoder(config, "llama", builder,
                                           mixture.tokenizer().vocab_size,
                                           r.workdir / "models" / "llama" / f"seed{seed}",
                                           seed=seed)
            with r.phase("analyse"):
                per_seed.append({"seed": seed, "training": trained.info,
                                 **analyse(trained.model, trained.params, calib, data, a)})
        results = {"seeds": seeds, "task_names": data.task_names, "per_seed": per_seed,
                   "headline": kit.aggregate([headline(s) for s in per_seed])}
        with r.phase("report"):
            plot_scores(r, per_seed)
            plot_curves(r, per_seed)
            r.write_results(results)
            r.write_report(report(config, results, r.timings))
        return results


def seed_mean(per_seed: list, get) -> np.ndarray:
    return np.mean([np.asarray(get(s), np.float64) for s in per_seed], axis=0)


def plot_scores(r: kit.Run, per_seed: list) -> None:
    with r.figure("scores.png", figsize=(6, 3.2)) as (_, ax):
        layers = np.arange(len(per_seed[0]["scores"]["attn"]))
        for offset, kind in zip((-0.27, 0.0, 0.27), llm_drop.KINDS):
            ax.bar(layers + offset, 1 - seed_mean(per_seed, lambda s: s["scores"][kind]), 0.27,
                   label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel("importance 1 - S")
        ax.set_yscale("log")
        ax.set_title(f"LLM-Drop importance (lower = more droppable; mean of {len(per_seed)} "
                     "seeds)")
        ax.legend()


def plot_curves(r: kit.Run, per_seed: list) -> None:
    with r.figure("curves.png", 1, 2, figsize=(10, 3.6)) as (_, axes):
        for name in per_seed[0]["curves"]:
            style = "-o" if name.endswith("one-shot") else "--x"
            for ax, metric in zip(axes, ("loss", "exact")):
                y = seed_mean(per_seed, lambda s: [p["all"][metric] for p in s["curves"][name]])
                ax.plot(np.arange(len(y)), y, style, label=name, markersize=3)
        axes[0].set_ylabel("test loss (targets)")
        axes[1].set_ylabel("test accuracy (exact match)")
        for ax in axes:
            ax.set_xlabel("sublayers dropped")
        axes[1].legend()


def claims(h: dict, n_layers: int, k: int) -> list[kit.Claim]:
    m = kit.mean_of
    s, gap = h["mean_s"], m(h["max_iterative_gap"])
    first, second = h["attn_s_halves"]
    drop = {v: m(h["exact"]) - m(h["exact_after_half"][v]) for v in h["exact_after_half"]}
    return [
        kit.Claim("Attention layers are more redundant than MLP layers (higher S)",
                  f"mean S attention {kit.pm(s['attn'], '.4f')} vs MLP {kit.pm(s['mlp'], '.4f')}"
                  f"; attention higher in {kit.pm(h['attn_above_mlp'], '.3g')} of {n_layers} "
                  "layers", m(s["attn"]) > m(s["mlp"]), "test: seed-mean S, attention > MLP"),
        kit.Claim("Deeper attention layers are the most droppable",
                  f"attention S, second half {kit.pm(second, '.4f')} vs first half "
                  f"{kit.pm(first, '.4f')}", m(second) > m(first),
                  "test: seed means, second > first"),
        kit.Claim("Dropping half the attention layers costs little (Llama-2-70B: 2.4% worse), "
                  "less than dropping as many MLP sublayers or blocks",
                  f"exact match {kit.pm(h['exact'], '.3f')} -> attention "
                  f"{kit.pm(h['exact_after_half']['attn'], '.3f')}, MLP "
                  f"{kit.pm(h['exact_after_half']['mlp'], '.3f')}, blocks "
                  f"{kit.pm(h['exact_after_half']['block'], '.3f')} (k = {k}, one-shot)",
                  drop["attn"] < min(drop["mlp"], drop["block"]),
                  "test: seed-mean accuracy loss, attention < MLP and blocks"),
        kit.Claim("The attention-dropped model runs faster (Llama-2-70B: 48.4%)",
                  f"{kit.pm(h['speedup']['attn'], '.2f', 'x')} the full model's speed on this "
                  "CPU", None, "CPU timings of a tiny model measure per-op overhead, not FLOPs"),
        kit.Claim("Iterative dropping is about as good as one-shot",
                  f"largest exact-match gap at equal k {kit.pm(h['max_iterative_gap'], '.3f')}",
                  gap <= 0.05, "test: seed-mean gap <= 0.05"),
    ]


def report(config, results: dict, timings: dict) -> str:
    per_seed, h = results["per_seed"], results["headline"]
    first, tasks = per_seed[0], results["task_names"]
    n_layers = len(first["scores"]["attn"])
    base = first["curves"]["attn/one-shot"][0]
    seed0 = f"seed {results['seeds'][0]}"
    notes = "; ".join(f"seed {s['seed']}: {kit.training_note(s['training'])}" for s in per_seed)
    lines = [
        "# LLM-Drop at small scale (METHODS.md item 4)", "",
        (f"Preset `{config.preset}`, training seeds {results['seeds']} (data seed "
         f"{config.seed}); {n_layers}-layer decoders (d_model {config.model.d_model}) trained "
         f"{first['training']['step']} steps on {', '.join(tasks)} "
         f"({notes}); "
         f"{kit.timings_line(timings)}. Scores on {config.analysis.n_calibration} training "
         f"prompts, metrics on {config.analysis.n_eval} test examples (teacher-forced; exact "
         "= every target token right). Numbers in `results.json`."), "",
        "## Against the paper's claims", "",
        *kit.claims_table(claims(h, n_layers, first["dropped_half"]["attn"]["k"])), "",
        (f"Unpruned: loss {kit.pm(h['loss'], '.3f')}, exact match {kit.pm(h['exact'], '.3f')} "
         f"({seed0}: " + ", ".join(f"{t} {base[t]['exact']:.3f}" for t in tasks if t in base)
         + ")."), "",
        "## Similarity scores S = mean cos(X, X + f(norm X))", "",
        "![scores](scores.png)", "",
        *kit.table(["layer", "attention", "MLP", "block"], [
            [layer] + [kit.pm(kit.aggregate([s["scores"][kind][layer] for s in per_seed]),
                              ".5f") for kind in llm_drop.KINDS] for layer in range(n_layers)]),
        "", "## Loss and accuracy vs number dropped", "", "![curves](curves.png)", "",
        f"Orders and accuracies of {seed0} (the others are in `results.json`).", "",
        *kit.table(["variant / mode", "order (first dropped first)",
                    "exact match after k = 0, 1, 2, ..."], [
            [name, ", ".join(s for s, _ in first["orders"][name]),
             " ".join(f"{p['all']['exact']:.2f}" for p in points)]
            for name, points in first["curves"].items()]),
        "", "## Genuinely dropped models (half of each variant, one-shot order)", "",
        ("Built by `mechinterp.llm_drop.drop` (parameters removed, config lists the kept "
         "sublayers); timed back to back with the full model, both unrolled, same batch "
         f"({config.analysis.n_eval} x {config.data.seq_len} tokens), best of "
         f"{config.analysis.timing_repeats} on this CPU; {seed0}, speedup over all seeds."), "",
        *kit.table(["variant", "dropped", "layers left", "params (full)", "exact match",
                    "loss", "speedup", "max abs logit diff vs zeroing"], [
            [v, ", ".join(d["dropped"]), d["n_layers"], f"{d['params']} ({d['full_params']})",
             f"{d['metrics']['all']['exact']:.3f}", f"{d['metrics']['all']['loss']:.3f}",
             kit.pm(h["speedup"][v], ".2f", "x"), f"{d['max_abs_logit_diff_vs_zeroed']:.1e}"]
            for v, d in first["dropped_half"].items()]),
        "", ("Caveats: small models trained for minutes on synthetic tasks; CPU timings of a "
             "tiny model are dominated by per-op overhead, not FLOPs, so speedups here say "
             "little about large models on accelerators."), ""]
    return "\n".join(lines)
