"""Self-Specialization's report.md: paper claim | ours, the per-model table, the data."""

from __future__ import annotations

import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.kit.domain import clear_gain
from mechinterp.experiments.self_specialization import data

NAMES = {"base": "base SmolLM2 (no tuning)", "seeds_only": "LoRA on the seeds only",
         "selfspec": "self-specialized (generated + retrieval, LoRA)",
         "no_retrieval": "self-specialized without retrieval (LoRA)"}


def _diffs(per_seed: list, a: str, b: str, key: str):
    return kit.aggregate([s[a][key] - s[b][key] for s in per_seed])


def lines(config, results: dict, timings: dict) -> list[str]:
    per, sm, pm = results["per_seed"], results["summary"], kit.pm
    models = ["base", *config.variants]
    gain_base = _diffs(per, "base", "selfspec", "answer_nll")
    gain_seeds = _diffs(per, "seeds_only", "selfspec", "answer_nll")
    general = _diffs(per, "selfspec", "base", "general_ppl")
    claims = [
        kit.Claim("Self-specialization improves the base model on the target domain "
                  "(MPT-30B, biomedical: large zero-shot gains)",
                  f"held-out answer NLL base - selfspec: {pm(gain_base, '+.3f')}; token "
                  f"accuracy {kit.mean_of(sm['base']['token_accuracy']):.3f} -> "
                  f"{pm(sm['selfspec']['token_accuracy'], '.3f')}",
                  clear_gain(gain_base), "mean - sd > 0"),
        kit.Claim("The self-generated data carve out more than the handful of seeds "
                  "(inferred: the paper's seeds-only ablation is not reported)",
                  f"answer NLL seeds-only - selfspec: {pm(gain_seeds, '+.3f')}",
                  clear_gain(gain_seeds), "mean - sd > 0"),
        kit.Claim("Retrieval reduces hallucination and helps the alignment",
                  *_retrieval(per, config)),
        kit.Claim("Efficient in data and parameters",
                  f"{kit.mean_of(sm['selfspec']['kept']):.1f} kept pairs of "
                  f"{config.generate.n_candidates}; LoRA trains "
                  f"{100 * kit.mean_of(sm['trainable_fraction']):.2f}% of the weights",
                  kit.mean_of(sm["trainable_fraction"]) < 0.01, "< 1% trainable"),
    ]
    rows = [(NAMES[m], pm(sm[m]["answer_ppl"], ".2f"), pm(sm[m]["token_accuracy"], ".3f"),
             pm(sm[m]["general_ppl"], ".2f"), pm(sm[m]["code_ppl"], ".2f"),
             "-" if m == "base" else pm(sm[m]["train_pairs"], ".1f")) for m in models]
    out = [
        "# Self-Specialization on SmolLM2-135M-Instruct", "",
        f"Seeds {results['seeds']} (sampling, LoRA init and batch order); checkpoint "
        f"{config.checkpoint!r}" + (f" truncated to {config.model.n_layers} layer(s)"
                                    if config.model.n_layers else "")
        + f"; LoRA rank {config.tune.rank} on attention q/v of every layer, "
        f"{config.tune.steps} steps of batch {config.tune.batch_size}.", "",
        "## Paper claim | ours", "", *kit.claims_table(claims), "",
        f"## Held-out domain and general text (mean ± sd over seeds; "
        f"{results['eval_size']} held-out questions)", "",
        *kit.table(["model", "answer perplexity", "answer token accuracy",
                    "general ppl (Apache-2.0)", "code ppl (textwrap.py)", "train pairs"], rows),
        "", f"General perplexity change selfspec - base: {pm(general, '+.2f')}.", "",
        *_data_lines(config, results), *_ablation_lines(results),
        "## What is simplified, inferred or synthetic", "",
        "- A 135M model instead of MPT-30B; the Python standard library instead of "
        "biomedicine; held-out answers are docstring first sentences (synthetic benchmark "
        "built offline), scored by teacher-forced perplexity / token accuracy, not by "
        "the paper's downstream task metrics.",
        "- Retrieval is lexical overlap over one-sentence docstring passages (the paper "
        "uses a BM25/dense retriever over PubMed); answers keep the first sentence only. "
        "The model mostly asks about builtins that are not in the corpus, so many answer "
        "prompts get no passage or an unrelated one (see the kept pairs above).",
        "- Self-specialized LoRA trains on the seeds plus the kept pairs; the baseline on "
        "the seeds alone, with the same steps. No model-perplexity filter.",
        "", f"Timings: {kit.timings_line(timings)}.",
    ]
    return out


def _retrieval(per, config):
    if "no_retrieval" not in config.variants:
        return ("not run in this preset (variants=" + str(tuple(config.variants)) + "; add "
                "'no_retrieval' to run it)", None, "CPU budget")
    d = _diffs(per, "no_retrieval", "selfspec", "answer_nll")
    return f"answer NLL without - with retrieval: {kit.pm(d, '+.3f')}", clear_gain(d), \
        "mean - sd > 0"


def _data_lines(config, results):
    g = config.generate
    first = results.get("selfspec", [{}])[0]
    kept = first.get("kept", [])
    sm = results["summary"]["selfspec"]
    dropped = {k: kit.mean_of(v) for k, v in sm["dropped"].items()} \
        if isinstance(sm.get("dropped"), dict) else sm.get("dropped")
    return [
        "## Data", "",
        f"- Seeds: {len(data.SEEDS)} hand-written instruction/answer pairs "
        f"(modules {sorted({q.split('`')[1].rsplit('.', 1)[0] for q, _ in data.SEEDS})}).",
        f"- Corpus for retrieval: {results['corpus_passages']} passages, one per documented "
        f"function of {list(data.RETRIEVAL_MODULES)}; {data.SOURCE}.",
        f"- Held-out questions: 'What does `module.func` do?' -> first docstring sentence, "
        f"modules {list(data.EVAL_MODULES)} (in neither seeds nor corpus).",
        f"- Generation: {g.n_candidates} instruction prompts of {g.shots} random seeds, "
        f"{g.instruction_tokens} + {g.answer_tokens} new tokens, temperature "
        f"{g.temperature}, top-k {g.top_k}; {results['sampler']}.",
        f"- Filters (first reason counted, mean per seed): {dropped}; ROUGE-L threshold "
        f"{g.max_rouge}.",
        f"- Kept pairs, seed {results['seeds'][0]} (first {len(kept)}), with the passage "
        "retrieved for each:", "",
        *(kit.table(["instruction", "answer", "retrieved"],
                    kept)
          if kept else ["(none kept)"]), "",
    ]


def _ablation_lines(results):
    ab = results.get("ablation")
    if not ab:
        return []
    rows = [(f"{g[0]}-{g[-1]}", f"{d:+.4f}") for g, d in zip(ab["groups"], ab["delta_nll"])]
    top = ab["groups"][int(np.argmax(ab["delta_nll"]))]
    return ["## Which layers' LoRA deltas matter (first seed)", "",
            f"Held-out answer NLL with all adapters: {ab['full_nll']:.3f}; increase when one "
            "group's adapter is removed:", "", *kit.table(["layers", "Δ NLL"], rows), "",
            f"Largest: layers {top[0]}-{top[-1]}.", ""]
