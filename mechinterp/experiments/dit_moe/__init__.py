"""DiT-MoE (Fei et al., 2024, "Scaling Diffusion Transformers to 16 Billion Parameters"),
small: class-conditional rectified-flow DiTs on upsampled digits (or shapes on textures).

Per training seed: a DiT-MoE (softmax top-2 router, weights not renormalised, SwiGLU
experts, a shared expert, balance loss 0.01) and a dense DiT whose SwiGLU MLP has the same
active parameters (``d_mlp = 2 d_expert + d_shared``) are trained alike; then flow loss on
held-out images at fixed noise, samples from the Euler sampler judged by a CNN trained here
(:mod:`.quality`: accuracy per class and a Fréchet distance, not FID), the paper's
specialization analysis on ``moe.weights`` recorded at every sampler step (:mod:`.routing`),
and per-expert ablation and forced routing (:mod:`mechinterp.experts`) scored by the flow
loss at high and low noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import capture, experts
from mechinterp.experiments import kit
from mechinterp.experiments.dit_moe import report
from mechinterp.experiments.dit_moe.quality import Judge, sample_quality
from mechinterp.experiments.dit_moe.routing import routing_summary
from mechinterp.models.diffusion import euler_sample, flow_pair
from mechinterp.models.dit import DiT
from mechinterp.train.flow import FlowSource, flow_objective
from mechinterp.train.images import KINDS, build_images, load_images

KINDS_OF_MODEL = ("moe", "dense")


def make_model(config, kind: str, n_classes: int, channels: int) -> DiT:
    m = config.model
    shared = dict(image_size=config.data.size, channels=channels, patch_size=m.patch_size,
                  d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                  n_classes=n_classes, freq_dim=m.freq_dim,
                  null_class=config.train.label_dropout > 0)
    if kind == "moe":
        return DiT(**shared, n_experts=m.n_experts, top_k=m.top_k, d_expert=m.d_expert,
                   d_shared=m.d_shared, balance_coef=m.balance_coef)
    return DiT(**shared, mlp="swiglu", d_mlp=m.top_k * m.d_expert + m.d_shared)


def load_data(config, data_dir) -> dict:
    d = config.data
    builder = build_images(data_dir=data_dir, kind=d.kind, size=d.size,
                           per_class=d.per_class, seed=config.seed)
    return {split: load_images(builder, split) for split in ("train", "test")}


def loss_at(model, params, images, labels, t_values, seed: int) -> np.ndarray:
    """Flow loss on ``images`` at each ``t`` in ``t_values``, with noise fixed by ``seed``."""
    noise = np.random.default_rng(seed).normal(size=images.shape).astype(np.float32)
    apply = jax.jit(model.apply)
    out = []
    for t in t_values:
        tt = jnp.full(len(images), t, jnp.float32)
        x_t, target = flow_pair(images, noise, tt)
        v = apply({"params": params}, x_t, tt, labels)
        out.append(float(jnp.mean(jnp.square(v - target))))
    return np.array(out)


def expert_edits(model, params, images, labels, t_values, seed: int) -> dict:
    """Flow-loss increase at each t when each (layer, expert) is ablated, and when each
    layer is forced to one expert (weight: the mean top-2 weight sum), from the clean loss."""
    noise = np.random.default_rng(seed).normal(size=images.shape).astype(np.float32)
    n_layers, n_experts = model.n_layers, model.n_experts
    ablate = np.zeros((len(t_values), n_layers, n_experts))
    force = np.zeros_like(ablate)
    for i, t in enumerate(t_values):
        tt = jnp.full(len(images), t, jnp.float32)
        x_t, target = flow_pair(images, noise, tt)
        kw = dict(t=tt, y=labels)
        _, cache = capture(model, params, x_t, sites=["moe.weights"], **kw)
        mean_sum = np.asarray(cache["moe.weights"]).sum(-1).mean(axis=(1, 2))
        clean = float(jnp.mean(jnp.square(model.apply({"params": params}, x_t, tt, labels)
                                          - target)))
        for layer in range(n_layers):
            for e in range(n_experts):
                out = experts.ablate_experts(model, params, x_t, [(layer, e)], **kw)
                ablate[i, layer, e] = float(jnp.mean(jnp.square(out - target))) - clean
                out = experts.force_routing(model, params, x_t, layer,
                                            {e: float(mean_sum[layer])}, **kw)
                force[i, layer, e] = float(jnp.mean(jnp.square(out - target))) - clean
    return {"ablate": ablate, "force": force}


def sample(model, params, config, n_classes: int, channels: int, seed: int, sites=()):
    """Class-conditional samples from fixed noise: ``({guidance: samples in [0, 1]},
    labels, cache of the guided run)``, for ``analysis.guidance`` and, where it is not 1,
    for 1 (no guidance) from the same noise, both from one compiled sampler."""
    a = config.analysis
    if a.guidance != 1 and not model.null_class:
        raise ValueError(f"analysis.guidance={a.guidance} needs a null class: set "
                         f"train.label_dropout > 0 (or analysis.guidance=1)")
    labels = np.repeat(np.arange(n_classes), a.samples_per_class).astype(np.int32)
    shape = (len(labels), config.data.size, config.data.size, channels)
    noise = np.random.default_rng([seed, 1]).normal(size=shape).astype(np.float32)
    null = {"null_kwargs": {"y": np.full_like(labels, n_classes)}} if model.null_class else {}
    run = jax.jit(lambda p, z, y, w: euler_sample(
        model, p, z, a.sampling_steps, sites=sites, y=y, **({"guidance": w, **null}
                                                             if null else {})))
    out, cache = {}, None
    for w in dict.fromkeys((float(a.guidance), 1.0)):
        images, read = run(params, noise, labels, jnp.float32(w))
        out[w] = np.clip((np.asarray(images) + 1) / 2, 0, 1)
        cache = read if cache is None else cache
    return out, labels, cache


def final_train_loss(path: Path) -> float:
    """The flow term (without the balance loss) of the last logged training record."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = [rec for rec in records if rec.get("kind") == "train"][-1]
    return float(last["ce"])


def analyse(config, kind, trained, judge, data, real_features, n_classes, channels, seed):
    model, params = trained.model, trained.params
    a = config.analysis
    x_test, y_test = data["test"]
    x_test = x_test[: a.eval_images] * 2 - 1
    y_test = y_test[: a.eval_images]
    out = {"loss_by_t": loss_at(model, params, x_test, y_test, a.t_values, config.seed)}
    out["loss"] = float(out["loss_by_t"].mean())
    sites = ("moe.weights",) if kind == "moe" else ()
    by_scale, labels, cache = sample(model, params, config, n_classes, channels,
                                     config.seed, sites)
    samples = by_scale[float(a.guidance)]
    out["quality"] = sample_quality(judge, samples, labels, real_features, n_classes)
    if a.guidance != 1:   # the same noise without guidance, for comparison
        out["quality_unguided"] = sample_quality(judge, by_scale[1.0], labels,
                                                 real_features, n_classes)
    out["active_mlp_params"] = model.active_mlp_params()
    out["info"] = trained.info
    out["train_loss"] = final_train_loss(Path(trained.info["folder"]) / "metrics.jsonl")
    per_class = samples.reshape(n_classes, a.samples_per_class, *samples.shape[1:])
    arrays = {"samples": per_class[:, :a.grid_per_class].reshape(-1, *samples.shape[1:])}
    if kind == "moe":
        out["routing"] = routing_summary(cache["moe.weights"], labels, seed)
        edits = expert_edits(model, params, x_test[: a.edit_images], y_test[: a.edit_images],
                             a.edit_t_values, config.seed)
        out["edits"] = {k: v.tolist() for k, v in edits.items()}
    return out, arrays


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        n_classes, channels = KINDS[config.data.kind]
        with r.phase("data"):
            data = load_data(config, r.workdir / "data")
            x, y = data["train"]
            source = FlowSource(x * 2 - 1, y, config.train.repeats)
        with r.phase("judge"):
            judge = Judge(config, data, n_classes)
            _, real_features = judge.logits_and_features(data["test"][0])
        per_seed = {k: [] for k in KINDS_OF_MODEL}
        grids = {}
        for seed in kit.train_seeds(config):
            for kind in KINDS_OF_MODEL:
                model = make_model(config, kind, n_classes, channels)
                with r.phase(f"{kind}/train"):
                    trained = kit.train_or_reuse(
                        model, source, kit.train_config(config.train, seed=seed,
                                                        progress=config.progress),
                        r.workdir / "models" / kind / f"seed{seed}",
                        data_spec={**config.data.to_dict(),
                                   "label_dropout": config.train.label_dropout},
                        retrain=config.retrain, objective=flow_objective(
                            config.train.label_dropout, n_classes))
                with r.phase(f"{kind}/analysis"):
                    result, arrays = analyse(config, kind, trained, judge, data,
                                             real_features, n_classes, channels, seed)
                per_seed[kind].append(result)
                grids.setdefault(kind, arrays["samples"])
        results = {"per_seed": per_seed, "judge_test_accuracy": judge.test_accuracy,
                   "summary": report.summarize(per_seed)}
        with r.phase("report"):
            report.figures(r, per_seed, grids, config)
            r.write_results(results, {f"samples/{k}": v for k, v in grids.items()})
            r.write_report(report.markdown(config, results, r.timings))
