"""Transformer fusion with optimal transport (Imfeld et al., ICLR 2024), small.

Per seed, two parents of one architecture are trained independently (ViT on digits, a
decoder on a copy task), fused one-shot by vanilla averaging and by OT fusion
(:mod:`mechinterp.train.ot_fusion`: exact assignment and Sinkhorn), evaluated, then every
fused model and parent B are fine-tuned for the same few steps and evaluated again.
"""

from __future__ import annotations

import copy

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import Classifier
from mechinterp.experiments.ot_fusion import report
from mechinterp.experiments.slab import load_digits_images
from mechinterp.models.decoder import Decoder, DecoderConfig
from mechinterp.models.vit import ViT
from mechinterp.train import ot_fusion

FUSED = ("vanilla", "ot_exact", "ot_sinkhorn")


def copy_task(config, seed: int, n: int):
    """Sequences ``a_1..a_h a_1..a_h`` of uniform tokens: (inputs, next-token targets)."""
    d = config.decoder
    first = np.random.default_rng(seed).integers(0, d.vocab, (n, d.half))
    seq = np.concatenate([first, first], 1).astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


def make_family(config, family: str, data_dir):
    """(model, train x, train y, test x, test y, evaluate(variables) -> metrics)."""
    if family == "vit":
        v = config.vit
        x, y, xt, yt = load_digits_images(config, data_dir)
        model = ViT(image_size=8, patch_size=v.patch_size, d_model=v.d_model,
                    n_layers=v.n_layers, n_heads=v.n_heads, d_mlp=v.d_mlp, n_classes=10,
                    pool="mean")
        keep = slice(None)
    else:
        d = config.decoder
        x, y = copy_task(config, config.seed, d.num_train)
        xt, yt = copy_task(config, config.seed + 10_000, d.num_test)
        model = Decoder(DecoderConfig(vocab_size=d.vocab, d_model=d.d_model,
                                      n_layers=d.n_layers, n_heads=d.n_heads,
                                      n_kv_heads=d.n_heads, d_mlp=d.d_mlp))
        keep = slice(d.half - 1, None)  # the copied half: predictable from context

    def evaluate(trainer, variables):
        logits = np.asarray(trainer.logits(variables, xt), np.float32)[..., keep, :] \
            if family == "decoder" else np.asarray(trainer.logits(variables, xt), np.float32)
        target = yt[..., keep] if family == "decoder" else yt
        loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                               jnp.asarray(target))
        return {"accuracy": float(np.mean(logits.argmax(-1) == target)),
                "loss": float(jnp.mean(loss))}
    return model, (x, y, xt, yt), evaluate


def run_pair(config, family: str, seed: int, setup) -> tuple[dict, dict]:
    model, (x, y, _, _), evaluate = setup
    f = config[family]
    train = Classifier(model, steps=f.steps, batch_size=config.batch_size,
                       learning_rate=f.learning_rate)
    tune = copy.copy(train)  # the same compiled step: fine-tuning differs only in steps
    tune.steps = config.finetune.steps
    # unboxed from the start: parents and fused models share one compiled step
    parents = [train.fit(nn.meta.unbox(train.init(s, x)), x, y, s)[0]
               for s in (seed, seed + 1000)]
    align_x = x[:config.align_examples]
    models = {"parent_a": parents[0]["params"], "parent_b": parents[1]["params"],
              "vanilla": ot_fusion.average(parents[0]["params"], parents[1]["params"])}
    for solver in ("exact", "sinkhorn"):
        models[f"ot_{solver}"] = ot_fusion.ot_fuse(
            model, parents[0]["params"], parents[1]["params"], (align_x,), solver=solver,
            epsilon=config.epsilon)
    one_shot = {k: evaluate(train, {"params": p}) for k, p in models.items()}
    tuned = {}
    for name in ("parent_b",) + FUSED:
        variables, _ = tune.fit({"params": models[name]}, x, y, seed + 7)
        tuned[name] = evaluate(tune, variables)
    return one_shot, tuned


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        results = {}
        for family in config.families:
            with r.phase(f"{family}/data"):
                setup = make_family(config, family, r.workdir / "data")
            per_seed = []
            for seed in kit.train_seeds(config):
                with r.phase(f"{family}/train+fuse"):
                    one_shot, tuned = run_pair(config, family, seed, setup)
                per_seed.append({"one_shot": one_shot, "finetuned": tuned})
            results[family] = {"per_seed": per_seed, "summary": kit.aggregate(per_seed)}
        with r.phase("report"):
            report.figure(r, results)
            r.write_results(results)
            r.write_report(report.markdown(config, results, r.timings))
