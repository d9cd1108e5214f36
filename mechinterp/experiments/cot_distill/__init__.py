"""Specializing smaller LMs by chain-of-thought distillation (METHODS.md item 11); config in
``configs/cot_distill.py``.

A program writes multi-step arithmetic solutions (:mod:`.data`). A larger decoder trained
here on its chain-of-thought text is the teacher whose per-token distribution the KL
student matches. Per training seed a small base student learns the generic tasks, then is
specialized (fine-tuned from the base) three ways: answer-only text, CoT text, and CoT text
with loss (1 - alpha) NLL + alpha KL(p_teacher || p_student) per token
(:func:`mechinterp.train.token_distill.distill_objective`). Each is scored on the
final-answer accuracy of its greedy generation (KV-cache sampling, ``models/generate.py``)
and on the generic tasks' exact match (the specialization vs generic-ability trade-off).
"""

from __future__ import annotations

import jax
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.cot_distill.data import (Mixtures, encode, final_answer,
                                                     make_mixtures, source, split_prompt)
from mechinterp.experiments.cot_distill.report import report_markdown
from mechinterp.experiments.kit import lm
from mechinterp.models.generate import generate
from mechinterp.train.token_distill import distill_objective

VARIANTS = ("answer_only", "cot", "cot_kl")


def generated_answers(model, params, data, m: Mixtures, max_new: int) -> list[list[str]]:
    """Greedy continuations (words) of every example's prompt, prompts grouped by length."""
    prompts, _ = split_prompt(data)
    out: list = [None] * len(prompts)
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        tokens = np.asarray(generate(model, params, np.stack([prompts[i] for i in rows]),
                                     max_new_tokens=max_new))
        for i, row in zip(rows, tokens[:, length:]):
            out[i] = [m.tokenizer.vocab[t] for t in row.tolist()]
    return out


def arithmetic_scores(model, params, cot_test, m: Mixtures) -> dict:
    """Final-answer accuracy of greedy generation, and how often the whole teacher text
    (CoT steps included) is reproduced."""
    _, targets = split_prompt(cot_test)
    words = generated_answers(model, params, cot_test, m, max(map(len, targets)))
    truth = [[m.tokenizer.vocab[t] for t in target] for target in targets]
    final = [final_answer(w) == final_answer(t) for w, t in zip(words, truth)]
    full = [w[:len(t)] == t for w, t in zip(words, truth)]
    return {"final_answer_acc": float(np.mean(final)), "teacher_text_exact": float(np.mean(full)),
            "example": " ".join(words[0])}


def generic_scores(model, params, generic_test) -> dict:
    metrics = lm.lm_metrics(model, params, generic_test)
    return {"exact": metrics["all"]["exact"],
            **{f"{t}_exact": metrics[t]["exact"] for t in generic_test.task_names}}


def teacher_logprobs(model, params, tokens, chunk: int = 512) -> np.ndarray:
    parts = [jax.nn.log_softmax(lm.logits_of(model, params, tokens[i:i + chunk]), -1)
             for i in range(0, len(tokens), chunk)]
    return np.concatenate([np.asarray(p, np.float32) for p in parts])


def train(config, section, vocab, src, folder, seed, *, spec, **fit_kwargs) -> kit.Trained:
    """Train (or reuse) a LLaMA-style decoder of ``section.model`` (a student: the base's)."""
    model = section.get("model", config.base.model)
    module = lm.decoder(model.to_dict(), "llama", vocab)
    t = kit.train_config(section.train, seed=seed, progress=config.progress)
    return kit.train_or_reuse(module, src, t, folder, data_spec=spec, retrain=config.retrain,
                              **fit_kwargs)


def scores(trained, data) -> dict:
    cot_test, generic_test, m = data
    return {"arithmetic": arithmetic_scores(trained.model, trained.params, cot_test, m),
            "generic": generic_scores(trained.model, trained.params, generic_test)}


@kit.job
def run(config, workdir) -> dict:
    """Teacher once, then per seed: base student, three specialized students, scores."""
    with kit.Run(config, workdir) as r:
        d, models = config.data, r.workdir / "models"
        with r.phase("data"):
            m = make_mixtures(config)
            vocab = m.tokenizer.vocab_size
            train_sets = {"answer_only": encode(m, m.answer_only, "train", d.num_train),
                          "cot": encode(m, m.cot, "train", d.num_train)}
            generic_train = encode(m, m.generic, "train", d.num_generic_train)
            data = (encode(m, m.cot, "test", d.num_test),
                    encode(m, m.generic, "test", d.num_test), m)
        spec = d.to_dict()
        with r.phase("teacher"):
            teacher = train(config, config.teacher, vocab, source(train_sets["cot"]),
                            models / "teacher", config.seed, spec={**spec, "text": "cot"})
            logprobs = teacher_logprobs(teacher.model, teacher.params, train_sets["cot"].tokens)
            results = {"teacher": {**scores(teacher, data), "training": teacher.info}}
        sources = {"answer_only": source(train_sets["answer_only"]),
                   "cot": source(train_sets["cot"]),
                   "cot_kl": source(train_sets["cot"], teacher_logprobs=logprobs)}
        per_seed = []
        for seed in kit.train_seeds(config):
            folder = models / f"seed{seed}"
            with r.phase(f"seed{seed}/base"):
                base = train(config, config.base, vocab, source(generic_train),
                             folder / "base", seed, spec={**spec, "text": "generic"})
                row = {"base": scores(base, data)}
            for variant in VARIANTS:
                with r.phase(f"seed{seed}/{variant}"):
                    kl = variant == "cot_kl"
                    student = train(
                        config, config.student, vocab, sources[variant], folder / variant, seed,
                        spec={**spec, "text": variant, "alpha": config.alpha if kl else 0.0,
                              "base": base.info["fingerprint"],
                              "teacher": teacher.info["fingerprint"] if kl else None},
                        init_params=base.params,
                        **({"objective": distill_objective(config.alpha)} if kl else {}))
                    row[variant] = scores(student, data)
            per_seed.append(row)
        results.update(seeds=kit.train_seeds(config), per_seed=per_seed,
                       students=kit.aggregate([{k: {"arithmetic": {
                           n: v for n, v in s["arithmetic"].items() if n != "example"},
                           "generic": s["generic"]} for k, s in row.items()}
                           for row in per_seed]))
        with r.phase("report"):
            r.write_results(results)
            r.write_report(report_markdown(config, results, r.timings))
    return results
