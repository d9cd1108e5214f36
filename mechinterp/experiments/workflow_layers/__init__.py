"""Workflow-aware structured layer decomposition (illustration production), small.

An illustration is flat colour (normal), shadow (multiply), highlight (screen) and line art
(normal) blended on white paper, the upper three in a random order
(:func:`mechinterp.train.layered_scenes.illustration`). A dilated conv net reads the
illustration once; per layer kind a learned *layer semantic embedding* shifts its features
before a shared RGBA head (the paper's per-layer task guidance), and a pooled head scores
the three pairwise orders of the upper layers. Layer-wise losses: alpha and premultiplied
colour MSE per layer, binary cross-entropy of the pairwise orders, and the recomposition
MSE (the predicted layers blended in the true order vs the input). The ablation replaces
the embeddings by one head that outputs all four layers at once.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.experiments.layered import conv, metrics
from mechinterp.experiments.workflow_layers import report
from mechinterp.train.layered_scenes import (ILLUSTRATION_LAYERS, ILLUSTRATION_MODES,
                                             arrays, build_illustrations, composite)

PAIRS = ((1, 2), (1, 3), (2, 3))  # upper-layer kinds; target 1 when the first is below
N = len(ILLUSTRATION_LAYERS)


class LayerNet(nn.Module):
    """``image -> (layers (..., N, H, W, 4), pair_logits (..., 3))``."""

    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 1)
    embeddings: bool = True

    @nn.compact
    def __call__(self, x):
        h = conv.trunk(x, self.width, self.dilations)
        pair_logits = nn.Dense(len(PAIRS), name="order")(nn.gelu(h).mean((-2, -3)))
        if self.embeddings:
            e = self.param("layer_embed", nn.initializers.normal(1.0), (N, self.width))
            hk = nn.gelu(h[..., None, :, :, :] + e[:, None, None, :])
            hk = nn.gelu(nn.Conv(self.width, (3, 3), name="layer_conv")(hk))
            layers = nn.Conv(4, (1, 1), name="head")(hk)
        else:
            hk = nn.gelu(nn.Conv(self.width, (3, 3), name="layer_conv")(nn.gelu(h)))
            layers = nn.Conv(4 * N, (1, 1), name="head")(hk)
            layers = jnp.moveaxis(layers.reshape(*layers.shape[:-1], N, 4), -2, -4)
        return nn.sigmoid(layers), pair_logits


def pair_targets(order) -> np.ndarray:
    """(B, 3) 1.0 where the first kind of each pair in :data:`PAIRS` is below the second."""
    pos = np.argsort(np.asarray(order), -1)
    return np.stack([(pos[:, a] < pos[:, b]) for a, b in PAIRS], -1).astype(np.float32)


def order_from_pairs(logits) -> np.ndarray:
    """(B, 4) the order (kinds bottom to top, flat colour first) of the permutation of the
    upper three that agrees with the most pairwise predictions."""
    perms = [(0, *p) for p in itertools.permutations((1, 2, 3))]
    agree = np.stack([((np.asarray(logits) > 0) == pair_targets(np.array([p]))).sum(-1)
                      for p in perms], -1)
    return np.asarray(perms)[agree.argmax(-1)]


ORDERS = [(0, *p) for p in itertools.permutations((1, 2, 3))]


def order_codes(order) -> np.ndarray:
    """(B,) index of each order in :data:`ORDERS`."""
    return np.array([ORDERS.index(tuple(int(k) for k in o)) for o in np.asarray(order)])


def recompose(layers, codes):
    """(B, H, W, 3): each sample's layers (B, N, H, W, 4) blended on white paper in the
    order ``ORDERS[codes]`` (every order is computed, then one selected: jit-friendly)."""
    paper = jnp.ones(layers.shape[:1] + layers.shape[-3:-1] + (3,))
    outs = jnp.stack([composite(paper, layers[:, list(o)], [ILLUSTRATION_MODES[k] for k in o])
                      for o in ORDERS], 1)
    return outs[jnp.arange(layers.shape[0]), codes]


def losses(model, params, x, true, pairs, codes) -> dict:
    """The layer-wise losses of the module docstring."""
    layers, logits = model.apply({"params": params}, x)
    a, ta = layers[..., 3:], true[..., 3:]
    return {"alpha": jnp.mean((a - ta) ** 2),
            "colour": jnp.mean((a * layers[..., :3] - ta * true[..., :3]) ** 2),
            "order": optax.sigmoid_binary_cross_entropy(logits, pairs).mean(),
            "recomposition": jnp.mean((recompose(layers, codes) - x) ** 2)}


def train(config, model, data, seed: int):
    t = config.train
    tx = optax.adam(t.learning_rate)

    def loss(params, *batch):
        terms = losses(model, params, *batch)
        return sum(terms.values()), terms

    @jax.jit
    def step(params, opt_state, *batch):
        (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, terms

    pairs, codes = pair_targets(data["order"]), order_codes(data["order"])
    params = jax.jit(model.init, compiler_options=FAST_COMPILE)(
        jax.random.key(seed), data["inputs"][:1])["params"]
    opt_state, rng = tx.init(params), np.random.default_rng(seed)
    for _ in range(t.steps):
        i = rng.choice(len(pairs), t.batch_size)
        params, opt_state, _ = step(params, opt_state, data["inputs"][i], data["layers"][i],
                                    pairs[i], codes[i])
    return params


def evaluate(model, params, test) -> tuple[dict, np.ndarray]:
    layers, logits = jax.jit(model.apply)({"params": params}, test["inputs"])
    order = order_from_pairs(logits)
    recomposed = np.asarray(recompose(layers, order_codes(order)))
    layers = np.asarray(layers, np.float64)
    out = {f"iou_{name}": metrics.alpha_iou(layers[:, k, ..., 3], test["layers"][:, k, ..., 3])
           for k, name in enumerate(ILLUSTRATION_LAYERS)}
    # pairs among the upper three only (flat colour is always at the bottom): chance 0.5
    out["order_pairwise"] = metrics.pairwise_order_accuracy(order[:, 1:], test["order"][:, 1:])
    out["order_exact"] = float(np.mean((order == test["order"]).all(-1)))
    out["recomposition_mse"] = float(np.mean((recomposed - test["inputs"]) ** 2))
    return out, layers


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            d = config.data
            b = build_illustrations(data_dir=r.workdir / "data", size=d.size,
                                    n_train=d.n_train, n_test=d.n_test, seed=config.seed)
            data, test = arrays(b, "train"), arrays(b, "test")
        per_variant, predictions = {}, {}
        for variant in config.variants:
            model = LayerNet(config.model.width, tuple(config.model.dilations),
                             embeddings=variant == "embeddings")
            runs = []
            for seed in kit.train_seeds(config):
                with r.phase(f"train/{variant}"):
                    params = train(config, model, data, seed)
                with r.phase(f"evaluate/{variant}"):
                    result, layers = evaluate(model, params, test)
                runs.append(result)
                predictions.setdefault(variant, layers)
            per_variant[variant] = {"per_seed": runs, "summary": kit.aggregate(runs)}
        with r.phase("report"):
            report.figures(r, test, predictions)
            results = {"variants": per_variant}
            r.write_results(results)
            r.write_report(report.markdown(config, results, r.timings))
