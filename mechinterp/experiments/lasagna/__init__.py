"""LASAGNA (Yang et al., 2026), small: generate a background, an RGBA foreground (with its
shadow and reflection) and their composite jointly, from a class and a location.

One DiT (:class:`~mechinterp.models.dit.DiT`, flow matching) generates a 10-channel image
``[B (3), F (RGB + alpha, 4), I (3)]`` per sample, conditioned on the object's shape class
(adaLN) and its bounding box on the patch grid as four joint-attention tokens (the location
mask). Coherence of the generated layers (:func:`~mechinterp.experiments.layered.metrics.
layer_coherence`: ``I`` vs ``F`` over ``B``) is compared with layers and composites taken
from two independent samples of the same conditioning; location adherence is the share of
the foreground (alpha > 0.5) inside its box, against the box of another sample.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.lasagna import report
from mechinterp.experiments.layered import flow, metrics
from mechinterp.models.diffusion import euler_sample
from mechinterp.models.dit import DiT
from mechinterp.train.layered_scenes import OBJECT_SHAPES, arrays, build_scenes


def stack_layers(data) -> np.ndarray:
    """(n, H, W, 10) in [-1, 1]: background, foreground RGBA, composite."""
    x = np.concatenate([data["background"], data["foregrounds"][:, 0], data["inputs"]], -1)
    return 2 * x - 1


def box_tokens(masks, patch: int) -> np.ndarray:
    """(n, 4) ids ``(y0, G + x0, 2G + y1, 3G + x1)``: the bounding box of ``mask > 0.5`` on
    the ``G x G`` patch grid (inclusive corners)."""
    m = np.asarray(masks) > 0.5
    g = m.shape[-1] // patch
    rows, cols = m.any(-1), m.any(-2)
    first = lambda a: a.argmax(-1)  # noqa: E731
    last = lambda a: a.shape[-1] - 1 - a[..., ::-1].argmax(-1)  # noqa: E731
    return np.stack([first(rows) // patch, g + first(cols) // patch,
                     2 * g + last(rows) // patch, 3 * g + last(cols) // patch], -1).astype(np.int32)


def box_regions(tokens, size: int, patch: int) -> np.ndarray:
    """(n, H, W) pixel masks of the boxes of :func:`box_tokens`."""
    g = size // patch
    y0, x0, y1, x1 = (np.asarray(tokens)[:, k] - k * g for k in range(4))
    grid = np.arange(size) // patch
    inside_y = (grid >= y0[:, None]) & (grid <= y1[:, None])
    inside_x = (grid >= x0[:, None]) & (grid <= x1[:, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


def make_model(config) -> DiT:
    m, size = config.model, config.data.size
    return DiT(image_size=size, channels=10, patch_size=m.patch_size, d_model=m.d_model,
               n_layers=m.n_layers, n_heads=m.n_heads, d_mlp=m.d_mlp,
               n_classes=len(OBJECT_SHAPES), cond_vocab=4 * (size // m.patch_size), n_cond=4,
               freq_dim=m.freq_dim)


def split_layers(x) -> dict:
    x = np.clip((np.asarray(x, np.float64) + 1) / 2, 0, 1)
    return {"background": x[..., :3], "foreground": x[..., 3:7], "composite": x[..., 7:]}


def analyse(config, model, params, test) -> tuple[dict, dict]:
    e, p = config.eval, config.model.patch_size
    n = min(e.n_samples, len(test["inputs"]))
    y, cond = test["labels"][:n, 0], box_tokens(test["masks"][:n, 0], p)
    rng = np.random.default_rng([config.seed, 11])
    shape = (n, config.data.size, config.data.size, 10)
    a, b = (split_layers(euler_sample(model, params, rng.normal(size=shape).astype(np.float32),
                                      e.n_steps, y=jnp.asarray(y), cond=jnp.asarray(cond))[0])
            for _ in range(2))
    boxes = box_regions(cond, config.data.size, p)
    owned = np.where(a["foreground"][..., 3] > 0.5, 0, -1)
    joint = metrics.layer_coherence(a["background"], a["foreground"], a["composite"])
    mixed = metrics.layer_coherence(a["background"], a["foreground"], b["composite"])
    out = {"joint": joint, "independent": mixed,
           "in_box": metrics.region_adherence(owned, boxes[:, None]),
           "in_other_box": metrics.region_adherence(owned, np.roll(boxes, 1, 0)[:, None]),
           "soft_alpha": soft_share(a["foreground"][..., 3]),
           "soft_alpha_data": soft_share(test["foregrounds"][:n, 0, ..., 3])}
    return out, {**a, "boxes": boxes}


def soft_share(alpha) -> float:
    """Share of pixels with 0.05 < alpha < 0.7: the semi-transparent shadow and reflection."""
    a = np.asarray(alpha)
    return float(((a > 0.05) & (a < 0.7)).mean())


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            d = config.data
            builder = build_scenes(data_dir=r.workdir / "data", size=d.size, n_train=d.n_train,
                                   n_test=config.eval.n_samples, seed=config.seed)
            train_data, test = arrays(builder, "train"), arrays(builder, "test")
            images = stack_layers(train_data)
            y = train_data["labels"][:, 0]
            cond = box_tokens(train_data["masks"][:, 0], config.model.patch_size)
        model = make_model(config)
        stepper = flow.make_step(model, config.train.learning_rate)
        runs, curves, first = flow.seed_runs(
            r, config, lambda seed: flow.train(
                model, stepper, images, lambda idx, _: {"y": y[idx], "cond": cond[idx]},
                steps=config.train.steps, batch_size=config.train.batch_size, seed=seed),
            lambda params: analyse(config, model, params, test))
        with r.phase("report"):
            results = {"per_seed": runs, "summary": kit.aggregate(runs)}
            report.figures(r, first, curves)
            r.write_results(results, {"loss": curves})
            r.write_report(report.markdown(config, results, r.timings))
