"""TARTE (table representations pretrained for reuse), small.

A :class:`~mechinterp.models.table.TableTransformer` is pretrained contrastively
(SimCLR's InfoNCE through a projection head; the two views of a row drop random cells and
add noise to the values) on several real tables (:mod:`mechinterp.train.tables`):
``general`` on statsmodels' tables only, ``specialized`` also on the downstream tables'
rows without their targets. Frozen, its readout feeds simple scikit-learn learners
(linear, k-NN) on iris, wine, breast cancer and diabetes (5-fold CV), against the same
learners and HistGradientBoosting on the raw features, the raw features concatenated with
the embeddings, and the untrained (random-init) encoder's embeddings.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.experiments.projection_head import nt_xent
from mechinterp.experiments.tarte import report
from mechinterp.models.table import TableTransformer
from mechinterp.train import tables as tabledata


class Pretrainer(nn.Module):
    """``(names, values, mask) -> (h, z)``: the encoder's readout and the head's output."""

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int

    @nn.compact
    def __call__(self, names, values, mask):
        h = TableTransformer(self.d_model, self.n_layers, self.n_heads, self.d_mlp,
                             name="encoder")(names, values, mask)
        return h, nn.Dense(self.d_model, name="proj_out")(
            nn.relu(nn.Dense(self.d_model, name="proj_in")(h)))


def view(key, values, mask, drop: float, noise: float):
    """A random view of rows: each present cell dropped with probability ``drop`` (a row
    left empty keeps all), Gaussian noise of scale ``noise`` on the values."""
    k_drop, k_noise = jax.random.split(key)
    keep = mask & (jax.random.uniform(k_drop, values.shape) >= drop)
    keep = jnp.where(keep.any(-1, keepdims=True), keep, mask)
    return values + noise * jax.random.normal(k_noise, values.shape), keep


def pretrain(config, tables: list, seed: int):
    """``(model, initial params, trained params, losses)`` after ``config.train.steps``
    InfoNCE steps, each on ``batch_size`` distinct rows of one uniformly drawn table."""
    m, t = config.model, config.train
    packed = [tabledata.padded(tab, m.n_cols, m.d_name) for tab in tables
              if len(tab.values) >= t.batch_size]
    if not packed:
        raise ValueError(f"no pretraining table has train.batch_size={t.batch_size} rows")
    model = Pretrainer(m.d_model, m.n_layers, m.n_heads, m.d_mlp)
    tx = optax.adam(t.learning_rate)

    def loss(params, key, names, values, mask):
        names = jnp.broadcast_to(names, values.shape + names.shape[-1:])
        mask = jnp.broadcast_to(mask, values.shape)
        k1, k2 = jax.random.split(key)
        _, z1 = model.apply({"params": params}, names, *view(k1, values, mask, t.drop,
                                                              t.noise))
        _, z2 = model.apply({"params": params}, names, *view(k2, values, mask, t.drop,
                                                              t.noise))
        return nt_xent(z1, z2, t.temperature)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE if config.fast_compile else None)
    def step(params, opt_state, key, names, values, mask):
        value, grads = jax.value_and_grad(loss)(params, key, names, values, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    names0, values0, mask0 = packed[0]
    init = jax.jit(model.init, compiler_options=FAST_COMPILE)
    params = init(jax.random.key(seed), names0[None], values0[:1], mask0[None])["params"]
    initial, opt_state = params, tx.init(params)
    rng, key, losses = np.random.default_rng(seed), jax.random.key(seed + 1), []
    for i in range(t.steps):
        names, values, mask = packed[rng.integers(len(packed))]
        rows = values[rng.choice(len(values), t.batch_size, replace=False)]
        params, opt_state, value = step(params, opt_state, jax.random.fold_in(key, i), names,
                                        rows, mask)
        losses.append(value)
    return model, initial, params, np.asarray(jnp.stack(losses))


def embed(config, model, params, table) -> np.ndarray:
    """The frozen encoder's readout for every row of ``table``."""
    names, values, mask = tabledata.padded(table, config.model.n_cols, config.model.d_name)
    encoder = TableTransformer(model.d_model, model.n_layers, model.n_heads, model.d_mlp)
    apply = jax.jit(encoder.apply, compiler_options=FAST_COMPILE)  # tiny: compile dominates
    b = values.shape[0]
    return np.asarray(apply({"params": params["encoder"]},
                            np.broadcast_to(names, (b,) + names.shape), values,
                            np.broadcast_to(mask, values.shape)))


def learners(task: str) -> dict:
    if task == "classification":
        return {"linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                "knn": make_pipeline(StandardScaler(), KNeighborsClassifier())}
    return {"linear": make_pipeline(StandardScaler(), RidgeCV(np.logspace(-3, 3, 13))),
            "knn": make_pipeline(StandardScaler(), KNeighborsRegressor())}


def cv_score(estimator, x, table, config) -> float:
    """Mean k-fold score: accuracy (classification) or R^2 (regression). One OpenMP
    thread: HistGradientBoosting's threads on a shared 2-core machine took 65 s instead of
    0.3 s to fit iris."""
    classify = table.task == "classification"
    folds = (StratifiedKFold if classify else KFold)(config.folds, shuffle=True,
                                                     random_state=config.seed)
    with threadpool_limits(1):
        return float(np.mean(cross_val_score(estimator, x, table.target, cv=folds,
                                             scoring="accuracy" if classify else "r2")))


def raw_scores(config, table) -> dict:
    """The same learners and HistGradientBoosting on the raw (standardized) features."""
    out = {f"raw/{k}": cv_score(est, table.values, table, config)
           for k, est in learners(table.task).items()}
    hgb = (HistGradientBoostingClassifier if table.task == "classification"
           else HistGradientBoostingRegressor)(random_state=config.seed)
    out["raw/hgb"] = cv_score(hgb, table.values, table, config)
    return out


def embedding_scores(config, model, params, table, prefix: str, with_raw: bool) -> dict:
    h = embed(config, model, params, table)
    sets = {prefix: h, **({f"raw+{prefix}": np.concatenate([table.values, h], 1)}
                          if with_raw else {})}
    return {f"{name}/{k}": cv_score(est, x, table, config) for name, x in sets.items()
            for k, est in learners(table.task).items()}


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            general = tabledata.pretraining_tables(config.data.max_rows, config.seed,
                                                   config.data.pretrain)
            downstream = tabledata.downstream_tables(config.data.downstream)
        with r.phase("baselines"):
            raw = {tab.name: raw_scores(config, tab) for tab in downstream}
        corpora = {"general": general, "specialized": general + downstream}
        per_seed, losses = [], {}
        for seed in kit.train_seeds(config):
            scores = {tab.name: {} for tab in downstream}
            for variant in config.variants:
                with r.phase(f"pretrain/{variant}"):
                    model, initial, params, curve = pretrain(config, corpora[variant], seed)
                losses.setdefault(variant, []).append(curve)
                with r.phase("evaluate"):
                    for tab in downstream:
                        scores[tab.name].update(embedding_scores(
                            config, model, params, tab, variant, variant == "general"))
                        if variant == config.variants[0]:
                            scores[tab.name].update(embedding_scores(
                                config, model, initial, tab, "random", False))
            per_seed.append(scores)
        results = {"raw": raw, "per_seed": per_seed, "summary": kit.aggregate(per_seed),
                   "tables": {"pretrain": [[t.name, len(t.values), len(t.columns)]
                                           for t in general],
                              "downstream": [[t.name, len(t.values), len(t.columns), t.task]
                                             for t in downstream]}}
        with r.phase("report"):
            report.figures(r, losses)
            r.write_results(results, {f"loss/{k}": np.stack(v) for k, v in losses.items()})
            r.write_report(report.markdown(config, results, r.timings))
