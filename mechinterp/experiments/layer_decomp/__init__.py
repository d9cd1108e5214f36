"""LayerDecomp (Yang et al., 2024), small: decompose a composite into a clean background and
an RGBA foreground that keeps its shadow and reflection.

A dilated convolutional net maps the composite ``I`` to a background ``B^`` and a
straight-alpha foreground ``(F^, a^)``. Labelled scenes (full layers; shadows only, the
"simulated" data) give ``|B^ - B|^2 + |a^ - a|^2 + |a^F^ - aF|^2``. Unlabelled pairs (the
"camera-captured" data: composite and clean background, no foreground; shadows and
reflections) give ``|B^ - B|^2`` and, with the consistency loss,
``lambda |a^ F^ + (1 - a^) B - I|^2`` (the predicted foreground composited on the known
background must give back the image). Trained with and without the consistency loss over
seeds; evaluated on held-out scenes with both effects.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.experiments.layer_decomp import report
from mechinterp.experiments.layered import conv, metrics
from mechinterp.train.layered_scenes import arrays, blend, build_scenes


class Decomposer(nn.Module):
    """``image (..., H, W, 3) -> (background (..., H, W, 3), foreground (..., H, W, 4))``:
    residual dilated 3x3 convolutions, sigmoid outputs."""

    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 1)

    @nn.compact
    def __call__(self, x):
        h = conv.trunk(x, self.width, self.dilations)
        out = nn.sigmoid(nn.Conv(7, (1, 1), name="head")(nn.gelu(h)))
        return out[..., :3], out[..., 3:]


def load_data(config, data_dir) -> dict:
    d = config.data
    common = {"data_dir": data_dir, "size": d.size, "seed": config.seed}
    labelled = build_scenes(n_train=d.n_labelled, n_test=1, reflection=False, **common)
    unlabelled = build_scenes(n_train=d.n_unlabelled, n_test=d.n_test, reflection=True,
                              **{**common, "seed": config.seed + 1000})
    return {"labelled": arrays(labelled, "train"), "unlabelled": arrays(unlabelled, "train"),
            "test": arrays(unlabelled, "test")}


def losses(model, params, lab, unl):
    """The terms of the module docstring (means over pixels and channels)."""
    bg, fg = model.apply({"params": params}, lab["inputs"])
    true = lab["foregrounds"][:, 0]
    a, ta = fg[..., 3:], true[..., 3:]
    supervised = (jnp.mean((bg - lab["background"]) ** 2) + jnp.mean((a - ta) ** 2)
                  + jnp.mean((a * fg[..., :3] - ta * true[..., :3]) ** 2))
    bg_u, fg_u = model.apply({"params": params}, unl["inputs"])
    return {"supervised": supervised,
            "background": jnp.mean((bg_u - unl["background"]) ** 2),
            "consistency": jnp.mean((blend("normal", fg_u, unl["background"])
                                     - unl["inputs"]) ** 2)}


def make_step(config):
    """``(model, tx, step)``: one compiled Adam step for every condition and seed (the
    consistency weight is an argument)."""
    model = Decomposer(config.model.width, tuple(config.model.dilations))
    tx = optax.adam(config.train.learning_rate)

    def loss(params, lab, unl, lam):
        terms = losses(model, params, lab, unl)
        return terms["supervised"] + terms["background"] + lam * terms["consistency"], terms

    @jax.jit
    def step(params, opt_state, lab, unl, lam):
        (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(params, lab, unl, lam)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, terms

    return model, tx, step


def train(config, stepper, data, seed: int, consistency: float):
    model, tx, step = stepper
    t = config.train
    lab_all = {k: data["labelled"][k] for k in ("inputs", "background", "foregrounds")}
    unl_all = {k: data["unlabelled"][k] for k in ("inputs", "background")}
    params = jax.jit(model.init, compiler_options=FAST_COMPILE)(
        jax.random.key(seed), lab_all["inputs"][:1])["params"]
    opt_state, rng, curve = tx.init(params), np.random.default_rng(seed), []
    for _ in range(t.steps):
        li = rng.choice(len(lab_all["inputs"]), t.batch_size)
        ui = rng.choice(len(unl_all["inputs"]), t.batch_size)
        params, opt_state, terms = step(params, opt_state,
                                        {k: v[li] for k, v in lab_all.items()},
                                        {k: v[ui] for k, v in unl_all.items()},
                                        jnp.float32(consistency))
        curve.append(terms)
    curve = {k: np.asarray(jnp.stack([c[k] for c in curve])) for k in curve[0]}
    return model, params, curve


def evaluate(model, params, test) -> tuple[dict, dict]:
    """Metrics on held-out scenes (shadows and reflections) and the predictions."""
    bg, fg = jax.jit(model.apply)({"params": params}, test["inputs"])
    bg, fg = np.asarray(bg, np.float64), np.asarray(fg, np.float64)
    true = test["foregrounds"][:, 0].astype(np.float64)
    effects = (true[..., 3] > 0.05) & (test["masks"][:, 0] < 0.01)
    out = {"background_psnr": metrics.psnr(bg, test["background"]),
           "alpha_iou": metrics.alpha_iou(fg[..., 3], true[..., 3], threshold=0.1),
           "object_iou": metrics.alpha_iou(fg[..., 3], test["masks"][:, 0]),
           "recomposition_mse": metrics.recomposition_error(bg, fg[:, None], test["inputs"]),
           "effects_alpha_mae": float(np.abs(fg[..., 3] - true[..., 3])[effects].mean())}
    return out, {"background": bg, "foreground": fg}


def baselines(test) -> dict:
    """The composite itself taken as the background (the do-nothing decomposition)."""
    return {"input_as_background_psnr": metrics.psnr(test["inputs"], test["background"])}


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = load_data(config, r.workdir / "data")
        conditions = {"without": 0.0, "with": float(config.consistency_weight)}
        stepper = make_step(config)
        per_condition, curves, predictions = {}, {}, {}
        for name, weight in conditions.items():
            runs = []
            for seed in kit.train_seeds(config):
                with r.phase(f"train/{name}"):
                    model, params, curve = train(config, stepper, data, seed, weight)
                with r.phase(f"evaluate/{name}"):
                    result, pred = evaluate(model, params, data["test"])
                runs.append(result)
                curves.setdefault(name, []).append(curve)
                predictions.setdefault(name, pred)  # the first seed's, for the figure
            per_condition[name] = {"per_seed": runs, "summary": kit.aggregate(runs)}
        with r.phase("report"):
            report.figures(r, data["test"], predictions, curves)
            results = {"conditions": per_condition, "baselines": baselines(data["test"])}
            r.write_results(results, {f"loss/{c}/{k}": np.stack([s[k] for s in v])
                                      for c, v in curves.items() for k in v[0]})
            r.write_report(report.markdown(config, results, r.timings))
