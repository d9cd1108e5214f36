"""CoFiTune at small scale (METHODS.md item 7): ``mechinterp run configs/cofitune.py``.

Coarse: fine-tune only one (layer range x module type) of a pretrained decoder on the
domain, for every pair in the grid, and keep the pair with the best speciality +
versatility on validation rows. Fine: importance of attention heads and FFN neurons =
``|d KL / d m|`` for multiplicative unit masks ``m`` under the symmetric KL between two
unit-dropout passes on general data (:mod:`mechinterp.train.importance`), z-scored per
layer, ``|tanh|``; during fine-tuning each unit's gradients are multiplied by
``1 - importance``. Against full fine-tuning: speciality (domain exact match) vs
versatility (general exact match), and where the domain knowledge landed (each layer of
the tuned model reverted to the base). All runs share one compiled step: the trainable
part and the soft masks are gradient-mask values in the optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.adept import pretrain
from mechinterp.experiments.cofitune.report import lines
from mechinterp.experiments.kit import domain, lm
from mechinterp.train import importance as imp
from mechinterp.train import optim
from mechinterp.train.mesh import path_str

# Unit axis (after the layer axis) of each scanned per-layer kernel: heads, then neurons.
HEADS = {"layers/attn/wq": 2, "layers/attn/wk": 2, "layers/attn/wv": 2, "layers/attn/wo": 1}
NEURONS = {"layers/mlp/gate": 2, "layers/mlp/up": 2, "layers/mlp/down": 1}
MODULES = {"attn": ("layers/attn/", "layers/attn_norm/"),
           "mlp": ("layers/mlp/", "layers/mlp_norm/")}
MODULES["both"] = MODULES["attn"] + MODULES["mlp"]
UNITS = {"layers/attn/wo$": 1, "layers/mlp/down$": 1}


def _flat(params):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


def gradient_masks(params, layers: tuple[int, int], module: str, soft=None) -> dict:
    """``{'^path$': mask}`` for every leaf: 1 on the chosen layers' ``module`` weights
    (times ``1 - importance`` per unit when ``soft`` is given), 0 elsewhere. Shapes depend
    only on the parameters, so every choice fits one optimizer state."""
    out = {}
    for path, leaf in _flat(params).items():
        if not path.startswith("layers/"):
            out[f"^{path}$"] = np.zeros((1,) * leaf.ndim, np.float32)
            continue
        n = leaf.shape[0]
        on = np.zeros(n, np.float32)
        if path.startswith(MODULES[module]):
            on[layers[0]:layers[1]] = 1.0
        mask = np.broadcast_to(on.reshape([n] + [1] * (leaf.ndim - 1)),
                               _mask_shape(leaf, path)).copy()
        for table, key in ((HEADS, "heads"), (NEURONS, "neurons")):
            if soft is not None and path in table:
                unit_shape = [n] + [1] * (leaf.ndim - 1)
                unit_shape[table[path]] = leaf.shape[table[path]]
                mask = mask * (1.0 - soft[key]).reshape(unit_shape)
        out[f"^{path}$"] = mask.astype(np.float32)
    return out


def _mask_shape(leaf, path):
    shape = [leaf.shape[0]] + [1] * (leaf.ndim - 1)
    for table in (HEADS, NEURONS):
        if path in table:
            shape[table[path]] = leaf.shape[table[path]]
    return tuple(shape)


def unit_importance(apply, params, batches, rate: float, key) -> dict[str, np.ndarray]:
    """Heads (L, h) and neurons (L, m): ``|tanh(z-score per layer of |dKL/dm|)|``, the
    gradient averaged over ``batches`` and dropout draws."""
    masks = imp.ones_masks(params, UNITS)
    total = None
    for i, batch in enumerate(batches):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))

        def kl(masked, m, batch=batch, k1=k1, k2=k2):
            a = apply(imp.apply_masks(masked, imp.dropout_masks(k1, m, rate)), batch["tokens"])
            b = apply(imp.apply_masks(masked, imp.dropout_masks(k2, m, rate)), batch["tokens"])
            return imp.self_kl(a, b, batch["loss_mask"])

        g = imp.mask_gradient(kl, params, masks)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    out = {}
    for key_, path in (("heads", "layers/attn/wo"), ("neurons", "layers/mlp/down")):
        s = np.asarray(total[path])
        z = (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-12)
        out[key_] = np.abs(np.tanh(z))
    return out


def run_seed(config, data, val, seed: int) -> dict:
    model, base, _ = pretrain(config, data, seed)
    t = config.tune
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    loss = domain.lm_loss(apply)
    tx = optim.make_optimizer("adamw", t.learning_rate,
                              gradient_masks=gradient_masks(base, (0, 1), "both"))
    it = lambda: domain.batches(data.domain_train, t.batch_size, seed + 1000)  # noqa: E731

    def fit(masks):
        tuned, _, sec = domain.tune(loss, base, tx, it(), t.steps,
                                    prepare=lambda s: optim.set_gradient_masks(s, masks))
        return tuned, sec

    def score(params, sets):
        return {side: lm.metrics_from_logits(apply(params, jnp.asarray(ex.tokens)), ex)["all"]
                for side, ex in sets.items()}

    n_layers = model.config.n_layers
    out = {"base": score(base, {"general": data.general_test, "domain": data.domain_test})}
    grid = []
    for lo, hi in config.coarse.layer_ranges:
        for module in config.coarse.modules:
            tuned, _ = fit(gradient_masks(base, (lo, min(hi, n_layers)), module))
            v = score(tuned, val)
            grid.append({"layers": [lo, min(hi, n_layers)], "module": module,
                         "val_domain": v["domain"]["exact"], "val_general": v["general"]["exact"]})
    best = max(grid, key=lambda g: g["val_domain"] + g["val_general"])
    general_rows = [domain.rows(data.general_train, t.batch_size, k)
                    for k in range(t.n_importance)]
    soft = unit_importance(apply, base, general_rows, t.dropout, jax.random.key(seed))
    runs = {"full": gradient_masks(base, (0, n_layers), "both"),
            "coarse": gradient_masks(base, tuple(best["layers"]), best["module"]),
            "cofitune": gradient_masks(base, tuple(best["layers"]), best["module"], soft)}
    test = {"general": data.general_test, "domain": data.domain_test}
    domain_fn = jax.jit(lambda p: loss(p, domain.rows(data.domain_test, t.n_eval)))
    for name, masks in runs.items():
        tuned, sec = fit(masks)
        out[name] = {**score(tuned, test), "seconds": sec,
                     "revert_domain": domain.revert_sweep(domain_fn, tuned, base).tolist()}
    out["grid"] = grid
    out["best"] = {"layers": best["layers"], "module": best["module"]}
    out["importance_mean"] = {k: v.mean(1).tolist() for k, v in soft.items()}
    return out


def split_validation(data, n_val: int):
    """Hold out the last ``n_val`` train rows of each side as validation (not trained on)."""
    def cut(ex, keep):
        rows = np.arange(len(ex.tokens))
        rows = rows[:-n_val] if keep else rows[-n_val:]
        return lm.Examples(ex.tokens[rows], ex.loss_mask[rows], ex.task[rows], ex.real[rows],
                           ex.task_names)
    val = {"general": cut(data.general_train, False), "domain": cut(data.domain_train, False)}
    data.general_train = cut(data.general_train, True)
    data.domain_train = cut(data.domain_train, True)
    return val


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = domain.make_domain_data(config)
            val = split_validation(data, config.coarse.n_val)
        per_seed = []
        with r.phase("train"):
            for seed in kit.train_seeds(config):
                per_seed.append(run_seed(config, data, val, seed))
        results = {"seeds": kit.train_seeds(config), "per_seed": per_seed}
        r.write_results(results)
        r.write_report(lines(config, results, r.timings))
    return results
