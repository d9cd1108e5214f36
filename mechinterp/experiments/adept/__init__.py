"""ADEPT at small scale (METHODS.md item 6): ``mechinterp run configs/adept.py``.

Per training seed: pretrain a LLaMA-style decoder on general tasks (recall, chain) with a
little of the domain task (arith); then specialize it on the domain four ways from the
same base: full continual pretraining, LoRA, ADEPT's layer expansion with plain learning
rates, and full ADEPT (expansion + importance-decoupled unit learning rates). Measures
domain gain, general forgetting, trainable fraction and time, and where the domain
knowledge landed (each copy ablated; each layer of the full-CPT model reverted to the
base). Procedure: :mod:`.method`; report: :mod:`.report`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.adept import method, report
from mechinterp.experiments.kit import domain, lm
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.train import optim, peft

# LoRA targets of the scanned decoder: (batch_dims, in_dims) of each kernel.
LORA_TARGETS = {"attn/w[qkv]$": (1, 1), "attn/wo$": (1, 2), "mlp/(gate|up|down)$": (1, 1)}


def _apply(model):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def pretrain(config, data, seed):
    model = lm.decoder(config.model.to_dict(), "llama", data.vocab_size)
    params = jax.jit(model.init, compiler_options=FAST_COMPILE)(  # eager init compiles per op
        jax.random.key(seed), jnp.asarray(data.general_train.tokens[:2]))
    params = jax.tree.map(jnp.asarray, nn.meta.unbox(params["params"]))
    p = config.pretrain
    tx = optax.adamw(optim.lr_schedule("cosine", p.learning_rate, warmup_steps=p.warmup_steps,
                                       total_steps=p.steps), weight_decay=0.0)
    it = domain.batches(data.general_train, p.batch_size, seed,
                        share=(data.domain_train, p.domain_share))
    params, losses, seconds = domain.tune(domain.lm_loss(_apply(model)), params, tx, it,
                                          p.steps)
    return model, params, seconds


def specialize(config, data, model, base, seed) -> dict:
    t = config.tune
    apply, loss = _apply(model), domain.lm_loss(_apply(model))
    it = lambda: domain.batches(data.domain_train, t.batch_size, seed + 1000)  # noqa: E731
    domain_fn = lambda p: loss(p, domain.rows(data.domain_test, t.n_eval))  # noqa: E731
    n_base = sum(x.size for x in jax.tree.leaves(base))
    out = {"base": {**domain.evaluate(apply, base, data), "trainable": 0.0, "seconds": 0.0}}

    full, _, sec = domain.tune(loss, base, optax.adam(t.learning_rate), it(), t.steps)
    out["full"] = {**domain.evaluate(apply, full, data), "trainable": 1.0, "seconds": sec}
    out["full"]["revert_domain"] = domain.revert_sweep(jax.jit(domain_fn), full, base).tolist()

    adapter = peft.lora_init(base, LORA_TARGETS, t.lora_rank, jax.random.key(seed))
    lora_loss = lambda a, b: loss(peft.lora_params(base, a, t.lora_alpha), b)  # noqa: E731
    adapter, _, sec = domain.tune(lora_loss, adapter, optax.adam(t.lora_learning_rate), it(),
                                  t.steps)
    merged = peft.merge(base, adapter, t.lora_alpha)
    out["lora"] = {**domain.evaluate(apply, merged, data), "seconds": sec,
                   "trainable": peft.lora_size(adapter) / n_base}

    general_calib = domain.rows(data.general_train, t.n_calib)
    importance = method.layer_importance(jax.jit(lambda p: loss(p, general_calib)), base)
    chosen = sorted(np.argsort(importance)[:t.n_expand].tolist())
    big, expanded, copies = method.expand(model, base, chosen)
    big_apply, big_loss = _apply(big), domain.lm_loss(_apply(big))
    fns = {"domain": jax.jit(lambda p: big_loss(p, domain.rows(data.domain_test, t.n_eval))),
           "general": jax.jit(lambda p: big_loss(p, domain.rows(data.general_test, t.n_eval)))}
    before = method.copy_ablation(fns, expanded, copies)
    patterns = method.copy_patterns(copies)
    part = peft.trainable_part(expanded, patterns)
    grad_fn = jax.jit(jax.grad(big_loss))
    imp_batches = [domain.rows(data.general_train, t.batch_size, k)
                   for k in range(t.n_importance)]
    # one optimizer (so one compiled step) for both: the plain run keeps multipliers at 1
    tx = peft.peft_optimizer(optax.chain(
        optax.scale_by_adam(), optax.scale_by_learning_rate(t.learning_rate),
        optim.scale_by_multipliers(method.initial_multipliers(expanded, copies))), patterns)

    def every(step, params, state):  # stage 2: unit LRs from importance on general data
        scores = method.unit_importance(grad_fn, params, copies, imp_batches)
        return optim.set_multipliers(state, method.unit_multipliers(scores, params))

    for name, decoupled in (("expand", False), ("adept", True)):
        tuned, _, sec = domain.tune(big_loss, expanded, tx, it(), t.steps,
                                    every if decoupled else None, t.importance_every)
        out[name] = {**domain.evaluate(big_apply, tuned, data), "seconds": sec,
                     "trainable": peft.trainable_fraction(expanded, part)
                     * sum(x.size for x in jax.tree.leaves(expanded)) / n_base}
        if decoupled:
            out[name]["ablation_before"] = before
            out[name]["ablation_after"] = method.copy_ablation(fns, tuned, copies)
    out["layer_importance"] = importance.tolist()
    out["expanded_layers"] = chosen
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = domain.make_domain_data(config)
        per_seed = []
        for seed in kit.train_seeds(config):
            with r.phase("pretrain"):
                model, base, _ = pretrain(config, data, seed)
            with r.phase("specialize"):
                per_seed.append(specialize(config, data, model, base, seed))
        results = {"seeds": kit.train_seeds(config), "per_seed": per_seed,
                   "summary": report.summarize(per_seed)}
        r.write_results(results)
        r.write_report(report.lines(config, results, r.timings))
    return results
