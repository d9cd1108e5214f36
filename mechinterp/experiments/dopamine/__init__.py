"""Dopamine-style threshold-gain gates on a frozen MLP (METHODS.md item 8; form inferred).

    mechinterp run configs/dopamine.py

The paper's form was not confirmed from its text; the method here is METHODS.md's reading:
a frozen base, each hidden neuron ``i`` gets a threshold ``tau_i`` and gain ``g_i``;
training uses ``y_i = g_i h_i sigmoid((h_i - tau_i) / T)``, inference the hard gate
``g_i h_i 1[h_i > tau_i]`` (:func:`mechinterp.train.peft.threshold_gate`). Task: an MLP
pretrained on scikit-learn digits, half upright and half rotated by 45 degrees, is
specialized to rotated digits; frozen, bias-only, LoRA, the gates and full fine-tuning are
compared on rotated (target) and upright (general) test accuracy, trainable parameters
and the fraction of open gates.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from mechinterp.experiments import kit
from mechinterp.experiments.kit import domain
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.train import peft
from mechinterp.train.digits import MAX_PIXEL, rotate_image, split_indices

METHODS = ("frozen", "bias", "lora", "gates", "full")


class GatedMLP(nn.Module):
    """``widths`` ReLU layers then a linear head; with ``gates`` (``{"tau_k", "gain_k"}``
    per hidden layer) each hidden neuron passes through the threshold-gain gate."""

    widths: tuple[int, ...]
    n_classes: int = 10

    @nn.compact
    def __call__(self, x, gates=None, temperature: float = 0.1, hard: bool = False):
        hidden = []
        for k, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, name=f"Dense_{k}")(x))
            if gates is not None:
                x = peft.threshold_gate(x, gates[f"tau_{k}"], gates[f"gain_{k}"], temperature,
                                        hard)
            hidden.append(x)
        self.sow("intermediates", "hidden", tuple(hidden))
        return nn.Dense(self.n_classes, name="head")(x)


def digits(angle: float, seed: int):
    """``(x_upright, x_rotated, y, train_rows, test_rows)`` of load_digits in [0, 1]."""
    d = load_digits()
    images = d.images / MAX_PIXEL
    rotated = np.stack([rotate_image(im, angle) for im in images])
    train, test = split_indices(d.target, 0.25, seed)
    return (images.reshape(-1, 64).astype(np.float32),
            rotated.reshape(-1, 64).astype(np.float32), d.target.astype(np.int32), train, test)


def _batches(x, y, batch_size, seed):
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.integers(0, len(x), batch_size)
        yield {"x": jnp.asarray(x[rows]), "y": jnp.asarray(y[rows])}


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(logits, y) -> float:
    return float(np.mean(np.asarray(logits).argmax(-1) == y))


def run_seed(config, data, seed: int) -> dict:
    up, rot, y, train, test = data
    model = GatedMLP(tuple(config.model.widths))
    t = config.train
    rng = np.random.default_rng(seed)
    half = rng.random(len(train)) < 0.5  # the 50/50 upright / rotated pretraining mix
    x_mix = np.where(half[:, None], rot[train], up[train])
    params = jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.key(seed),
                                                              x_mix[:1])["params"]
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    loss = lambda p, b: _ce(apply(p, b["x"]), b["y"])  # noqa: E731
    base, _, _ = domain.tune(loss, params, optax.adam(t.learning_rate),
                             _batches(x_mix, y[train], t.batch_size, seed), t.pretrain_steps)
    it = lambda: _batches(rot[train], y[train], t.batch_size, seed + 1)  # noqa: E731
    n_base = sum(x.size for x in jax.tree.leaves(base))
    widths = config.model.widths
    a = config.adapt

    def scores(logits_fn, open_frac=None, trainable=0, seconds=0.0):
        return {"rotated": _accuracy(logits_fn(rot[test]), y[test]),
                "upright": _accuracy(logits_fn(up[test]), y[test]),
                "trainable": trainable / n_base, "trainable_params": int(trainable),
                "open_gates": open_frac, "seconds": seconds}

    def base_open(p, x):
        _, st = model.apply({"params": p}, x, mutable="intermediates")
        return float(np.mean(np.concatenate([np.asarray(h > 0).ravel() for h in
                                             st["intermediates"]["hidden"][0]])))

    out = {"frozen": scores(lambda x: apply(base, x), base_open(base, rot[test]))}

    patterns = peft.bias_patterns(base)
    tx = peft.peft_optimizer(optax.adam(a.learning_rate), patterns)
    tuned, _, sec = domain.tune(loss, base, tx, it(), t.adapt_steps)
    n_bias = sum(x.size for x in jax.tree.leaves(peft.trainable_part(base, patterns)))
    out["bias"] = scores(lambda x: apply(tuned, x), base_open(tuned, rot[test]), n_bias, sec)

    targets = {r"Dense_\d+/kernel$": (0, 1), "head/kernel$": (0, 1)}
    adapter = peft.lora_init(base, targets, a.lora_rank, jax.random.key(seed))
    lora_loss = lambda ad, b: loss(peft.lora_params(base, ad, a.lora_alpha), b)  # noqa: E731
    adapter, _, sec = domain.tune(lora_loss, adapter, optax.adam(a.learning_rate), it(),
                                  t.adapt_steps)
    merged = peft.merge(base, adapter, a.lora_alpha)
    out["lora"] = scores(lambda x: apply(merged, x), base_open(merged, rot[test]),
                         peft.lora_size(adapter), sec)

    gates = {**{f"tau_{k}": jnp.zeros(w) for k, w in enumerate(widths)},
             **{f"gain_{k}": jnp.ones(w) for k, w in enumerate(widths)}}

    def gated(g, x, hard):
        return model.apply({"params": base}, x, g, a.temperature, hard)

    gate_loss = lambda g, b: _ce(gated(g, b["x"], False), b["y"])  # noqa: E731
    gates, _, sec = domain.tune(gate_loss, gates, optax.adam(a.learning_rate), it(),
                                t.adapt_steps)
    # open fraction under the hard gates: each layer's gate input, layer by layer
    opens, x = [], jnp.asarray(rot[test])
    for k in range(len(widths)):
        h = nn.relu(x @ base[f"Dense_{k}"]["kernel"] + base[f"Dense_{k}"]["bias"])
        opens.append(np.asarray((h > gates[f"tau_{k}"]) & (h > 0)).ravel())
        x = peft.threshold_gate(h, gates[f"tau_{k}"], gates[f"gain_{k}"], hard=True)
    hard_logits = jax.jit(lambda g, x: gated(g, x, True))
    soft_logits = jax.jit(lambda g, x: gated(g, x, False))
    out["gates"] = scores(lambda x: hard_logits(gates, x), float(np.mean(np.concatenate(opens))),
                          sum(x.size for x in jax.tree.leaves(gates)), sec)
    out["gates"]["rotated_soft"] = _accuracy(soft_logits(gates, rot[test]), y[test])

    full, _, sec = domain.tune(loss, base, optax.adam(a.learning_rate), it(), t.adapt_steps)
    out["full"] = scores(lambda x: apply(full, x), base_open(full, rot[test]), n_base, sec)
    return out


@kit.job
def run(config, workdir):
    from mechinterp.experiments.dopamine.report import lines

    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = digits(config.data.angle, config.seed)
        per_seed = []
        with r.phase("train"):
            for seed in kit.train_seeds(config):
                per_seed.append(run_seed(config, data, seed))
        results = {"seeds": kit.train_seeds(config), "per_seed": per_seed,
                   "summary": kit.aggregate(per_seed)}
        r.write_results(results)
        r.write_report(lines(config, results, r.timings))
    return results
