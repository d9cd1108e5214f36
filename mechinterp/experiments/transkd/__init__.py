"""TransKD (Liu et al., 2023), small: distilling a SegFormer teacher into a 4x cheaper
student on synthetic shape segmentation (:mod:`mechinterp.train.seg_shapes`).

Per training seed a teacher is trained first (cross-entropy), then students from the same
initialisation with the distillation variants of :data:`distill.METHODS`: plain (no KD),
feature-map KD only, CSF only, TransKD-Base (CSF + PEA), and TransKD-Base with GL-Mixer or
with EA. Students read their feature maps and patch embeddings from their own sites; the
teacher's are read once from its sites for the whole training set. Scores: test mIoU
(:mod:`mechinterp.experiments.kit.segmentation`) and forward FLOPs from XLA's cost analysis
(:func:`mechinterp.train.flop_counts.xla_flops`). One compiled call trains every seed of a
model (:func:`mechinterp.experiments.kit.seed_fit.fit_seeds`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.kit.seed_fit import fit_seeds, init_seeds
from mechinterp.experiments.kit.segmentation import class_iou, mean_iou
from mechinterp.experiments.transkd import report
from mechinterp.experiments.transkd.distill import METHODS, Distiller, hcl, mse
from mechinterp.models.segformer import SegConfig, SegFormer
from mechinterp.train.flop_counts import xla_flops
from mechinterp.train.seg_shapes import build_seg_shapes, load_arrays

KINDS = ("features", "patch_embed")


def seg_configs(config) -> dict[str, SegConfig]:
    """The teacher's and the student's :class:`SegConfig` from ``config.model``."""
    m, d = config.model, config.data
    common = dict(sr_ratios=tuple(m.sr_ratios), strides=tuple(m.strides),
                  image_size=d.size, n_classes=1 + len(d.shapes))
    return {role: SegConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                               for k, v in m[role].items()}, **common)
            for role in ("teacher", "student")}


def read_sites(model, params, images, names):
    """``{name: array}`` of the top-level sites ``names`` in one forward."""
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    return {n: state["intermediates"][n] for n in names}


def _site_names(cfg: SegConfig) -> list[str]:
    return [f"s{i}.{k}" for i in range(1, len(cfg.dims) + 1) for k in KINDS]


def _chunked(fn, params, images, chunk):
    parts = [fn(params, images[k:k + chunk]) for k in range(0, len(images), chunk)]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *parts)


def ce(logits, masks):
    return optax.softmax_cross_entropy_with_integer_labels(logits, masks).mean()


def student_loss(student: SegFormer, distiller: Distiller | None, kd):
    """``loss(params, batch)``: pixel cross-entropy plus ``kd.w_features`` x HCL on the
    aligned feature maps and ``kd.w_embeds`` x the summed MSE on aligned embeddings."""
    n = len(student.config.dims)

    def loss(params, batch):
        if distiller is None:
            return ce(student.apply({"params": params["student"]}, batch["images"]),
                      batch["masks"])
        logits, state = student.apply({"params": params["student"]}, batch["images"],
                                      mutable=["intermediates"])
        sites = state["intermediates"]
        feats, embeds = ([sites[f"s{i}.{k}"] for i in range(1, n + 1)] for k in KINDS)
        f, e = distiller.apply({"params": params["kd"]}, batch["images"], feats, embeds)
        total = ce(logits, batch["masks"])
        if f:
            total += kd.w_features * hcl(f, [batch[f"t.s{i}.features"]
                                             for i in range(1, n + 1)])
        if e:
            total += kd.w_embeds * sum(mse(a, batch[f"t.s{i}.patch_embed"])
                                       for i, a in enumerate(e, 1))
        return total

    return loss


def train(config, model_init, loss, shared, per_seed) -> tuple:
    t = config.train
    seeds = kit.train_seeds(config)
    params = init_seeds(model_init, seeds, shared["images"][:1])
    return fit_seeds(loss, params, shared, per_seed, seeds, steps=t.steps,
                     batch_size=t.batch_size, learning_rate=t.learning_rate)


@functools.lru_cache(maxsize=8)
def _predict(model):
    return jax.jit(jax.vmap(lambda p, x: model.apply({"params": p}, x).argmax(-1),
                            in_axes=(0, None)))


def scores(model, params, images, masks, n_classes, chunk) -> list[dict]:
    """Per seed: test mIoU and per-class IoU of ``model`` with stacked ``params``."""
    pred = np.asarray(_chunked(_predict(model), params, images, chunk))
    return [{"miou": mean_iou(p, masks, n_classes),
             "class_iou": [None if np.isnan(v) else float(v)
                           for v in class_iou(p, masks, n_classes)]} for p in pred]


def run_all(config, data) -> dict:
    """Teacher, then every student variant; per-seed scores and the models' costs."""
    cfgs = seg_configs(config)
    teacher, student = SegFormer(cfgs["teacher"]), SegFormer(cfgs["student"])
    (x, y), (xt, yt) = data["train"], data["test"]
    shared = {"images": jnp.asarray(x), "masks": jnp.asarray(y)}
    n_classes, chunk = cfgs["student"].n_classes, config.eval_chunk
    t_params, t_losses = train(config, lambda k, im: {"student": teacher.init(k, im)["params"]},
                               student_loss(teacher, None, config.kd), shared, {})
    t_params = t_params["student"]
    names = _site_names(cfgs["teacher"])
    targets = _chunked(jax.jit(jax.vmap(lambda p, im: read_sites(teacher, p, im, names),
                                        in_axes=(0, None))), t_params, x, chunk)
    per_seed = {f"t.{k}": v for k, v in targets.items()}
    models = {"teacher": {"per_seed": scores(teacher, t_params, xt, yt, n_classes, chunk),
                          "final_loss": np.asarray(t_losses)[:, -10:].mean(1).tolist()}}
    for method in config.kd.methods:
        features, embeds = METHODS[method]
        distiller = None if features is None and embeds is None else Distiller(
            cfgs["student"], cfgs["teacher"], features, embeds, config.kd.mid)

        def init(key, im, distiller=distiller):
            k1, k2 = jax.random.split(key)
            p = {"student": student.init(k1, im)["params"]}  # same key: same student init
            if distiller is not None:
                sites = read_sites(student, p["student"], im, _site_names(cfgs["student"]))
                feats, embs = ([v for k, v in sites.items() if k.endswith(kind)]
                               for kind in KINDS)
                p["kd"] = distiller.init(k2, im, feats, embs)["params"]
            return p

        params, losses = train(config, init, student_loss(student, distiller, config.kd),
                               shared, per_seed if distiller else {})
        models[method] = {"per_seed": scores(student, params["student"], xt, yt, n_classes,
                                             chunk),
                          "final_loss": np.asarray(losses)[:, -10:].mean(1).tolist()}
    return {"models": models, "cost": costs(cfgs)}


def costs(cfgs) -> dict:
    """Forward GFLOPs per image (XLA cost analysis) and parameter counts."""
    out = {}
    for role, cfg in cfgs.items():
        model = SegFormer(cfg)
        x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        out[role] = {"gflops": xla_flops(model.apply, params, x) / 1e9,
                     "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))}
    out["flops_reduction"] = 1 - out["student"]["gflops"] / out["teacher"]["gflops"]
    return out


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            d = config.data
            builder = build_seg_shapes(data_dir=r.workdir / "data", size=d.size,
                                       n_train=d.n_train, n_test=d.n_test,
                                       shapes=tuple(d.shapes), n_objects=d.n_objects,
                                       domain=d.domain, seed=config.seed)
            data = {s: load_arrays(builder, s) for s in ("train", "test")}
        with r.phase("train"):
            results = run_all(config, data)
        for m in results["models"].values():
            m["summary"] = kit.aggregate([{"miou": s["miou"]} for s in m["per_seed"]])
        results["claims"] = [vars(c) for c in report.claims(results)]
        with r.phase("report"):
            r.write_results(results)
            r.write_report(report.markdown(config, results, r.timings))
