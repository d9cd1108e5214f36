"""MAGNET (multimodal recommendation with modality-role graph experts and two-stage
entropy-triggered routing), small: MF-BPR, LightGCN and MAGNET trained with BPR on the
synthetic data of :mod:`mechinterp.train.user_item`; Recall@K and NDCG@K overall and on
long-tail items, per training seed; MAGNET's routing entropy per step and when the
coverage -> specialization trigger fired, and the mean router probability of each role.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mechinterp.experiments import kit
from mechinterp.experiments.kit.classifier import FAST_COMPILE
from mechinterp.experiments.magnet import report
from mechinterp.models.graph_rec import MAGNET, MF, ROLES, LightGCN
from mechinterp.train import user_item

FAMILIES = {"mf": MF, "lightgcn": LightGCN, "magnet": MAGNET}


def build_model(name: str, config, data):
    m = config.model
    if name == "mf":
        return MF(data.n_users, data.n_items, m.d_model)
    if name == "lightgcn":
        return LightGCN(data.n_users, data.n_items, m.d_model, m.n_layers)
    if name == "magnet":
        return MAGNET(data.n_users, data.n_items, m.d_model, m.n_layers, m.n_content_layers)
    raise ValueError(f"unknown model {name!r} in config.models; known: {tuple(FAMILIES)}")


def routing_by_role(probs) -> dict:
    """Mean router probability of each role expert over items."""
    probs = np.asarray(probs)
    return {role: float(probs[:, e].mean()) for e, role in enumerate(ROLES)}


def train_one(name: str, config, data, graph, seed: int):
    t = config.train
    trigger = None
    if name == "magnet":
        trigger = user_item.EntropyTrigger(**config.trigger.to_dict())
    model = build_model(name, config, data)
    params, trace = user_item.fit_bpr(
        model, graph, data, steps=t.steps, batch_size=t.batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, seed=seed,
        entropy_beta=t.entropy_beta, trigger=trigger,
        compiler_options=FAST_COMPILE if config.fast_compile else None)
    users, items, aux = jax.jit(functools.partial(model.apply, method=model.embeddings))(
        {"params": params}, graph)
    out = user_item.top_k_metrics(users, items, data, config.k)
    if "router_probs" in aux:
        out["routing"] = routing_by_role(aux["router_probs"])
        out["trigger_step"] = trace["trigger_step"]
        out["final_entropy"] = trace["entropy"][-1]
        out["final_usage_entropy"] = trace["usage_entropy"][-1]
    return out, trace


@kit.job
def run(config, workdir):
    with kit.Run(config, workdir) as r:
        with r.phase("data"):
            data = user_item.make_interactions(**{k: v for k, v in config.data.items()
                                                  if k != "knn"}, seed=config.seed)
            graph = data.graph(config.data.knn)
        per_model, traces = {}, {}
        for name in config.models:
            runs = []
            for seed in kit.train_seeds(config):
                with r.phase(f"train/{name}"):
                    out, trace = train_one(name, config, data, graph, seed)
                runs.append(out)
                traces.setdefault(name, []).append(trace)
            per_model[name] = {"per_seed": runs, "summary": kit.aggregate(runs)}
        stats = {"users": data.n_users, "items": data.n_items, "train": len(data.train),
                 "test": len(data.test), "tail_items": int(data.tail.sum()),
                 "tail_test_share": float(data.tail[data.test[:, 1]].mean())}
        arrays = {f"{k}/{name}": np.array([tr[k] for tr in ts]) for name, ts in traces.items()
                  for k in ("bpr", "entropy", "usage_entropy") if k in ts[0]}
        with r.phase("report"):
            report.figures(r, traces)
            r.write_results({"data": stats, "models": per_model}, arrays)
            r.write_report(report.markdown(config, stats, per_model, r.timings))
