"""SLAB (Guo et al., 2024), small: progressive re-parameterized BatchNorm and simplified
linear attention in a ViT.

Trains ViTs on digits with LayerNorm, BatchNorm only, RepBN and PRepBN (lambda 1 -> 0 over
training), with softmax or simplified linear attention, over training seeds: test accuracy
(inference mode: running statistics, lambda = 0) and training stability (final loss, the
largest loss spike). Times one attention layer of each kind at growing token counts
(linear vs quadratic) and inference of a PRepBN network unfolded, folded
(:func:`~mechinterp.models.slab.fold_norms`) and of the LayerNorm network, checking the
fold is exact.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import Classifier
from mechinterp.experiments.slab import report
from mechinterp.models.layers import Attention
from mechinterp.models.slab import LinearAttention, fold_norms, prepbn_lambda
from mechinterp.models.vit import ViT
from mechinterp.train.digits import build_digits


def load_digits_images(config, data_dir):
    builder = build_digits(data_dir=data_dir, seed=config.seed)
    out = []
    for split in ("train", "test"):
        source = builder.as_data_source(split)
        records = source.__getitems__(range(len(source)))
        out += [np.stack([r["inputs"] for r in records]).reshape(-1, 8, 8, 1),
                np.array([r["label"] for r in records], np.int32)]
    return out


def make_model(config, variant: str) -> ViT:
    norm, attention = config.variants[variant]
    m = config.model
    return ViT(image_size=8, patch_size=m.patch_size, d_model=m.d_model, n_layers=m.n_layers,
               n_heads=m.n_heads, d_mlp=m.d_mlp, n_classes=10, pool="mean", norm=norm,
               attention=attention, scan_layers=False)


def train_variant(config, variant, data, seed):
    model = make_model(config, variant)
    x, y, x_test, y_test = data
    steps = config.train.steps
    trainer = Classifier(model, steps=steps, batch_size=config.train.batch_size,
                         learning_rate=config.train.learning_rate,
                         train_kwargs={"train": True},
                         schedule=lambda step: {"norm_lambda": prepbn_lambda(step, steps)})
    variables, losses = trainer.fit(trainer.init(seed, x), x, y, seed)
    finite = bool(np.all(np.isfinite(losses)))
    tail = losses[len(losses) // 2:]
    spike = float(np.max(np.diff(tail))) if finite and len(tail) > 1 else float("nan")
    return model, variables, {
        "accuracy": trainer.accuracy(variables, x_test, y_test) if finite else 0.0,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "max_spike": spike, "finite": finite}, losses


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def attention_latency(config) -> dict:
    """Seconds per forward of one attention layer at ``grid**2`` tokens, per kind."""
    a = config.latency
    heads, d = a.n_heads, a.d_model // a.n_heads
    out = {"tokens": [g * g for g in a.grids], "softmax": [], "linear": []}
    for g in a.grids:
        x = jax.random.normal(jax.random.key(0), (1, g * g, a.d_model))
        mask = jnp.ones((1, g * g, g * g), bool)
        soft = Attention(heads, heads, d, qkv_bias=True)
        lin = LinearAttention(heads, d, g)
        p_soft = soft.init(jax.random.key(1), x, None, mask)
        p_lin = lin.init(jax.random.key(1), x)
        out["softmax"].append(_median_seconds(
            jax.jit(lambda p, x, m: soft.apply(p, x, None, m)[0]), p_soft, x, mask,
            repeats=a.repeats))
        out["linear"].append(_median_seconds(jax.jit(lin.apply), p_lin, x, repeats=a.repeats))
    return out


def inference_speed(config, trained: dict, x) -> dict:
    """Seconds per batch: PRepBN unfolded and folded, and LayerNorm (if trained); the
    fold's error."""
    model, variables = trained["PRepBN"]
    folded_model, folded = fold_norms(model, variables)
    unfolded = jax.jit(model.apply)
    fold_fn = jax.jit(folded_model.apply)
    repeats = config.latency.repeats
    out = {"prepbn_unfolded": _median_seconds(unfolded, variables, x, repeats=repeats),
           "prepbn_folded": _median_seconds(fold_fn, {"params": folded}, x, repeats=repeats),
           "fold_max_abs_diff": float(jnp.abs(unfolded(variables, x)
                                              - fold_fn({"params": folded}, x)).max())}
    if "LN" in trained:
        ln_model, ln_variables = trained["LN"]
        out["layernorm"] = _median_seconds(jax.jit(ln_model.apply), ln_variables, x,
                                           repeats=repeats)
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = load_digits_images(config, r.workdir / "data")
        per_variant, curves, trained = {}, {}, {}
        for variant in config.variants:
            runs = []
            for seed in kit.train_seeds(config):
                with r.phase(f"train/{variant}"):
                    model, variables, result, losses = train_variant(config, variant, data,
                                                                     seed)
                runs.append(result)
                curves.setdefault(variant, []).append(losses)
                if seed == config.seed:
                    trained[variant] = (model, variables)
            per_variant[variant] = {"per_seed": runs, "summary": kit.aggregate(runs)}
        with r.phase("latency"):
            latency = attention_latency(config)
            speed = inference_speed(config, trained, data[2][:config.latency.batch])
        results = {"variants": per_variant, "latency": latency, "inference": speed}
        with r.phase("report"):
            report.figures(r, curves, latency)
            r.write_results(results, {f"loss/{k}": np.stack(v) for k, v in curves.items()})
            r.write_report(report.markdown(config, results, r.timings))
