"""Self-Specialization (Kang et al. 2023; METHODS.md item 12) on SmolLM2-135M-Instruct:
``mechinterp run configs/self_specialization.py``.

Per seed (sampling and LoRA-init seed): the model writes instructions from few-shot seed
prompts and answers them with a retrieved standard-library passage in the prompt
(:mod:`.pipeline`); the pairs are filtered (:mod:`.filtering`); LoRA on the attention
query/value kernels of every layer is tuned on seeds + kept pairs ("selfspec") and, as
the baseline, on the seeds alone. Scored on held-out stdlib questions (answer perplexity,
token accuracy; :mod:`.data`) and on general English (Apache-2.0 text perplexity) against
the base model; for the first seed, each group of layers' adapter is ablated on the
domain eval. The data, prompts and filters are documented in report.md (:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.kit import domain, domain_text
from mechinterp.experiments.recall_reasoning.paper import load_checkpoint
from mechinterp.experiments.self_specialization import data, filtering, pipeline, report
from mechinterp.train import peft
from mechinterp.train.losses import next_token_terms

LORA_TARGETS = {"attn/w[qv]$": (1, 1)}  # scanned (layer, d_model, heads, d_head) kernels


def _with_base(batches, base):
    """Batches that carry the frozen weights as an argument (not a compiled-in constant)."""
    for batch in batches:
        yield {**batch, "base": base}


class Scorer:
    """Answer perplexity and token accuracy of parameters on encoded rows, in fixed-size
    chunks (one compiled program)."""

    def __init__(self, model, chunk: int):
        self.chunk = chunk
        self._terms = jax.jit(lambda p, t, m: next_token_terms(
            model.apply({"params": p}, t), {"tokens": t, "loss_mask": m}))

    def __call__(self, params, ex) -> dict:
        n = len(ex.tokens)
        pad = -n % self.chunk
        tokens = np.concatenate([ex.tokens, np.repeat(ex.tokens[:1], pad, 0)])
        mask = np.concatenate([ex.loss_mask, np.zeros((pad,) + ex.loss_mask.shape[1:])])
        total = {"loss": 0.0, "weight": 0.0, "correct": 0.0}
        for i in range(0, n + pad, self.chunk):
            t = self._terms(params, jnp.asarray(tokens[i:i + self.chunk]),
                            jnp.asarray(mask[i:i + self.chunk], jnp.float32))
            total = {k: total[k] + float(t[k]) for k in total}
        nll = total["loss"] / total["weight"]
        return {"answer_nll": nll, "answer_ppl": math.exp(nll),
                "token_accuracy": total["correct"] / total["weight"]}


def evaluate(lm, params, scorer, eval_rows, e) -> dict:
    texts = domain_text.general_vs_domain(dataclasses.replace(lm, params=params),
                                          e.general_tokens, e.window)
    return {**scorer(params, eval_rows), "general_ppl": texts["general"]["perplexity"],
            "code_ppl": texts["domain"]["perplexity"]}


def layer_ablation(scorer, base, adapter, alpha, rows, n_groups: int) -> dict:
    """Held-out answer NLL increase when the adapter of one group of layers is removed."""
    full = scorer(peft.merge(base, adapter, alpha), rows)["answer_nll"]
    n_layers = jax.tree.leaves(adapter)[0].shape[0]
    groups = [g.tolist() for g in np.array_split(np.arange(n_layers), n_groups)]
    deltas = []
    for g in groups:
        keep = jnp.asarray(~np.isin(np.arange(n_layers), g), jnp.float32)
        cut = jax.tree.map(lambda x: x * keep.reshape((-1,) + (1,) * (x.ndim - 1)), adapter)
        deltas.append(scorer(peft.merge(base, cut, alpha), rows)["answer_nll"] - full)
    return {"groups": groups, "delta_nll": deltas, "full_nll": full}


def self_data(lm, config, passages, seed: int, variant: str):
    """Training pairs of ``variant`` (seeds, plus the kept generated pairs unless
    ``seeds_only``), the filter counts, and the first kept pairs with their passages."""
    seed_pairs = list(data.SEEDS)
    if variant == "seeds_only":
        return seed_pairs, {}, None
    g = config.generate
    pairs, found, stage = pipeline.self_generate(lm, g, passages, np.random.default_rng(seed),
                                                 seed, retrieval=variant == "selfspec")
    kept, dropped = filtering.filter_pairs(pairs, [q for q, _ in seed_pairs],
                                           max_rouge=g.max_rouge)
    info = {"generated": g.n_candidates, "kept": len(kept), "dropped": {
        **stage["instructions"], **{f"answer_{k}": v for k, v in dropped.items()}}}
    shown = {"seed": seed, "kept": [(q, a, found.get(q, "-")) for q, a in kept[:8]]}
    return seed_pairs + kept, info, shown


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("load"):
            lm = pipeline.truncated(load_checkpoint(config.checkpoint),
                                    config.model.n_layers or None)
            pipeline.check_chat_tokens(lm)
            passages = data.documented(data.RETRIEVAL_MODULES)
            t, e = config.tune, config.eval
            eval_rows = pipeline.encode_pairs(lm, data.eval_pairs(e.n_eval, config.seed),
                                              t.seq_len)
            scorer = Scorer(lm.model, e.chunk)
            apply = lambda p, x: lm.model.apply({"params": p}, x)  # noqa: E731
            nll = domain.lm_loss(apply)
            loss = lambda a, b: nll(peft.lora_params(b["base"], a, t.alpha), b)  # noqa: E731
            tx = optax.adam(t.learning_rate)
        with r.phase("base"):
            base_scores = evaluate(lm, lm.params, scorer, eval_rows, e)
        per_seed, extra = [], {}
        for index, seed in enumerate(kit.train_seeds(config)):
            one = {"base": base_scores}
            for variant in config.variants:
                with r.phase(f"seed{seed}/{variant}"):
                    pool, info, shown = self_data(lm, config, passages, seed, variant)
                    if shown:
                        extra.setdefault(variant, []).append(shown)
                    rows = pipeline.encode_pairs(lm, pool, t.seq_len)
                    adapter = peft.lora_init(lm.params, LORA_TARGETS, t.rank,
                                             jax.random.key(seed))
                    it = _with_base(domain.batches(rows, t.batch_size, seed + 1000), lm.params)
                    adapter, losses, sec = domain.tune(loss, adapter, tx, it, t.steps)
                    merged = peft.merge(lm.params, adapter, t.alpha)
                    one[variant] = {**evaluate(lm, merged, scorer, eval_rows, e),
                                    "train_pairs": len(pool), "seconds": sec,
                                    "final_loss": float(losses[-1]), **info}
                    a = config.analysis
                    if index == 0 and variant == "selfspec" and a.n_groups:
                        sub = dataclasses.replace(eval_rows, tokens=eval_rows.tokens[:a.n_rows],
                                                  loss_mask=eval_rows.loss_mask[:a.n_rows])
                        extra["ablation"] = layer_ablation(scorer, lm.params, adapter, t.alpha,
                                                           sub, a.n_groups)
            one["trainable_fraction"] = peft.lora_size(adapter) / sum(
                x.size for x in jax.tree.leaves(lm.params))
            per_seed.append(one)
        results = {"seeds": kit.train_seeds(config), "per_seed": per_seed,
                   "summary": kit.aggregate(per_seed), "eval_size": len(eval_rows.tokens),
                   "corpus_passages": len(passages), **extra,
                   "sampler": "mechinterp.models.generate (KV cache), temperature + top-k"}
        with r.phase("report"):
            r.write_results(results)
            r.write_report(report.lines(config, results, r.timings))
    return results
