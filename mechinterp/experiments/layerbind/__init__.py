"""LayerBind (Wang et al., 2025), small: training-free regional and occlusion control on a
joint-attention DiT trained here.

The DiT (:class:`~mechinterp.models.dit.DiT`, flow matching) learns scenes of one or two
coloured shapes on a plain background from conditioning tokens ``(colour, shape)`` per
instance (two slots, in random order, ``null`` for a missing instance); the tokens say
nothing about where an object goes or which one is in front. At test time each sample gets
two overlapping boxes and a layer order; the plain sampler (every token, full attention)
is compared with LayerBind (:mod:`~mechinterp.experiments.layerbind.binding`) at several
fusion steps. Pixels are assigned to an instance by their nearest palette colour; region
adherence and occlusion-order accuracy are :mod:`mechinterp.experiments.layered.metrics`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.layerbind import binding, report
from mechinterp.experiments.layered import flow, metrics
from mechinterp.models.diffusion import euler_sample
from mechinterp.models.dit import DiT
from mechinterp.train.layered_scenes import OBJECT_SHAPES, arrays, build_scenes

PALETTE = ((0.9, 0.15, 0.1), (0.1, 0.8, 0.2), (0.15, 0.3, 0.95), (0.95, 0.85, 0.1))
SLOT, K = 2, 2  # tokens per instance (colour, shape), instances
NULL = len(PALETTE) + len(OBJECT_SHAPES)


def tokens(colours, labels, swap) -> np.ndarray:
    """(B, K * SLOT) ids: per instance its colour and ``len(PALETTE) + shape``, ``NULL``
    for absent ones; ``swap`` (B,) bools exchange the two slots."""
    c, s = np.asarray(colours), np.asarray(labels)
    t = np.stack([np.where(c >= 0, c, NULL), np.where(s >= 0, len(PALETTE) + s, NULL)], -1)
    t = np.where(np.asarray(swap)[:, None, None], t[:, ::-1], t)
    return t.reshape(len(c), -1).astype(np.int32)


def make_model(config) -> DiT:
    m = config.model
    return DiT(image_size=config.data.size, channels=3, patch_size=m.patch_size,
               d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_mlp=m.d_mlp,
               n_classes=0, cond_vocab=NULL + 1, n_cond=K * SLOT, freq_dim=m.freq_dim)


def train(config, model, stepper, data, seed: int):
    """Flow matching on images scaled to [-1, 1], the two slots swapped at random."""
    def conditioning(idx, rng):
        return {"cond": tokens(data["colours"][idx], data["labels"][idx],
                               rng.random(len(idx)) < 0.5)}

    return flow.train(model, stepper, 2 * data["inputs"] - 1, conditioning,
                      steps=config.train.steps, batch_size=config.train.batch_size, seed=seed)


def layouts(config) -> dict:
    """Test prompts: two distinct (colour, shape) instances, two overlapping boxes on the
    patch grid, and a random layer order; the same for every seed and method."""
    e, size, p = config.eval, config.data.size, config.model.patch_size
    rng = np.random.default_rng([config.seed, 7])
    n, box, shift = e.n_samples, e.box_patches * p, e.shift_patches * p
    regions = np.zeros((n, K, size, size), bool)
    for s in range(n):
        y0, x0 = rng.integers(0, size - box - shift + 1, 2) // p * p
        dy, dx = rng.choice([0, shift], 2, replace=True)
        corners = [(y0 + dy, x0 + dx), (y0 + shift - dy, x0 + shift - dx)]
        for k, (y, x) in enumerate(corners):
            regions[s, k, y:y + box, x:x + box] = True
    colours = np.stack([rng.permutation(len(PALETTE))[:K] for _ in range(n)])
    labels = rng.integers(len(OBJECT_SHAPES), size=(n, K))
    order = np.stack([rng.permutation(K) for _ in range(n)])
    return {"regions": regions, "colours": colours, "labels": labels, "order": order,
            "cond": tokens(colours, labels, np.zeros(n, bool)),
            "noise": rng.normal(size=(n, size, size, 3)).astype(np.float32)}


def assign(images, colours, threshold: float) -> np.ndarray:
    """(B, H, W) instance ids: the nearest of each sample's instance colours within
    ``threshold`` (RGB distance), else -1."""
    pal = np.asarray(PALETTE)[colours]  # (B, K, 3)
    d = np.linalg.norm(np.asarray(images)[:, None] - pal[:, :, None, None], axis=-1)
    return np.where(d.min(1) < threshold, d.argmin(1), -1)


def score(images, lay, threshold: float) -> dict:
    """Region adherence, occlusion-order accuracy and how often both instances show."""
    a = assign(images, lay["colours"], threshold)
    ordered = np.take_along_axis(lay["regions"], lay["order"][..., None, None], 1)
    relabelled = np.where(a >= 0, np.argsort(lay["order"], 1)[np.arange(len(a))[:, None, None],
                                                              np.maximum(a, 0)], -1)
    present = np.stack([(a == k).sum((1, 2)) >= 3 for k in range(K)], 1)
    return {"adherence": metrics.region_adherence(relabelled, ordered),
            "order_accuracy": metrics.occlusion_order_accuracy(relabelled, ordered),
            "both_present": float(present.all(1).mean())}


def analyse(config, model, params, lay) -> tuple[dict, dict]:
    e, m = config.eval, config.model
    velocity = binding.make_velocity(model, params)
    samples = {"plain": euler_sample(model, params, lay["noise"], e.n_steps,
                                     cond=jnp.asarray(lay["cond"]))[0]}
    for fuse in e.fusion_steps:
        samples[f"fuse{fuse}"] = binding.layerbind_sample(
            velocity, lay["noise"], lay["cond"], lay["regions"], lay["order"],
            n_steps=e.n_steps, fuse=fuse, beta=e.beta, patch=m.patch_size, slot=SLOT,
            null=NULL)
    images = {k: np.clip((np.asarray(v) + 1) / 2, 0, 1) for k, v in samples.items()}
    return {k: score(v, lay, e.colour_threshold) for k, v in images.items()}, images


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            d = config.data
            data = arrays(build_scenes(data_dir=r.workdir / "data", size=d.size,
                                       n_train=d.n_train, n_test=1, n_foregrounds=K,
                                       min_foregrounds=1, palette=PALETTE, plain=True,
                                       reflection=False, seed=config.seed), "train")
            lay = layouts(config)
        model = make_model(config)
        stepper = flow.make_step(model, config.train.learning_rate)
        runs, curves, first = flow.seed_runs(
            r, config, lambda seed: train(config, model, stepper, data, seed),
            lambda params: analyse(config, model, params, lay))
        with r.phase("report"):
            results = {"per_seed": runs, "summary": kit.aggregate(runs)}
            report.figures(r, config, lay, first, curves, results)
            r.write_results(results, {"loss": curves})
            r.write_report(report.markdown(config, results, r.timings))
