"""A synthetic multimodal user-item dataset, BPR training with MAGNET's entropy-triggered
routing regimes, and top-K metrics.

Generator (:func:`make_interactions`, deterministic in ``seed``): ``n_topics`` topic centres
in a ``d_latent`` space; item latent = its topic's centre + noise, user latent = a mix of
one or two centres + noise. Popularity is Zipf: item of popularity rank r has weight
``r^-zipf``. A user's items are drawn without replacement with probability
``∝ pop_i^pop_weight * exp(u . v_i / temperature)``, ``10 + Poisson(mean_extra)`` of them.
Content: the *visual* modality is a random linear map of the first half of the item's
latent plus noise, the *text* modality of the second half; a fraction ``conflict`` of items
has one modality replaced by noise (modalities that disagree). Per user, ``test_fraction``
of the items are held out. The item-item content graph links each item to its ``knn``
nearest items by cosine similarity of the standardized content. Long-tail items: all but
the ``head_fraction`` most popular in training.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechinterp.models.graph_rec import Edges, RecGraph


@dataclasses.dataclass
class Interactions:
    n_users: int
    n_items: int
    train: np.ndarray  # (n, 2) user, item
    test: np.ndarray
    visual: np.ndarray
    text: np.ndarray
    tail: np.ndarray  # bool (n_items,): long-tail item

    def graph(self, knn: int) -> RecGraph:
        return RecGraph(user_item_edges(self.train, self.n_users, self.n_items),
                        content_edges(self.visual, self.text, knn),
                        jnp.asarray(self.visual, jnp.float32),
                        jnp.asarray(self.text, jnp.float32))


def _content(latent, rng, dim, noise):
    out = latent @ rng.normal(size=(latent.shape[1], dim)) / np.sqrt(latent.shape[1])
    return out + noise * rng.normal(size=out.shape)


def make_interactions(*, n_users: int, n_items: int, n_topics: int, d_latent: int,
                      zipf: float, pop_weight: float, temperature: float, mean_extra: float,
                      visual_dim: int, text_dim: int, content_noise: float, conflict: float,
                      test_fraction: float, head_fraction: float, seed: int) -> Interactions:
    """The dataset the module docstring describes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_topics, d_latent))
    items = centres[rng.integers(n_topics, size=n_items)] + 0.5 * rng.normal(
        size=(n_items, d_latent))
    mix = rng.dirichlet(np.full(n_topics, 0.3), size=n_users)
    users = mix @ centres + 0.3 * rng.normal(size=(n_users, d_latent))
    pop = (1.0 + rng.permutation(n_items)) ** -zipf
    logits = pop_weight * np.log(pop) + users @ items.T / temperature
    train, test = [], []
    for u in range(n_users):
        p = np.exp(logits[u] - logits[u].max())
        k = min(n_items // 2, 10 + rng.poisson(mean_extra))
        chosen = rng.choice(n_items, size=k, replace=False, p=p / p.sum())
        n_test = max(1, int(round(test_fraction * k)))
        test += [(u, i) for i in chosen[:n_test]]
        train += [(u, i) for i in chosen[n_test:]]
    half = d_latent // 2
    visual = _content(items[:, :half], rng, visual_dim, content_noise)
    text = _content(items[:, half:], rng, text_dim, content_noise)
    broken = rng.random(n_items) < conflict
    which = rng.random(n_items) < 0.5
    for content, mask in ((visual, broken & which), (text, broken & ~which)):
        content[mask] = rng.normal(size=(mask.sum(), content.shape[1])) * content.std()
    train, test = np.array(train), np.array(test)
    counts = np.bincount(train[:, 1], minlength=n_items)
    head = np.argsort(-counts, kind="stable")[:int(round(head_fraction * n_items))]
    tail = np.ones(n_items, bool)
    tail[head] = False
    return Interactions(n_users, n_items, train, test, visual, text, tail)


def normalized_edges(senders, receivers, n_nodes: int, dtype=jnp.float32) -> Edges:
    """Both directions of each edge, weighted ``1 / sqrt(deg_s deg_r)`` (in ``dtype``)."""
    s = np.concatenate([senders, receivers])
    r = np.concatenate([receivers, senders])
    deg = np.maximum(np.bincount(s, minlength=n_nodes), 1)
    w = 1.0 / np.sqrt(deg[s] * deg[r])
    return Edges(jnp.asarray(s, jnp.int32), jnp.asarray(r, jnp.int32),
                 jnp.asarray(w, dtype))


def user_item_edges(train, n_users: int, n_items: int, dtype=jnp.float32) -> Edges:
    """The bipartite interaction graph over users then items (item ``i`` is node
    ``n_users + i``), symmetrically normalized."""
    return normalized_edges(train[:, 0], n_users + train[:, 1], n_users + n_items, dtype)


def content_edges(visual, text, knn: int) -> Edges:
    """Each item to its ``knn`` nearest items (cosine of standardized content)."""
    z = np.concatenate([(m - m.mean(0)) / (m.std(0) + 1e-8) for m in (visual, text)], 1)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-8
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1)[:, :knn]
    senders = np.repeat(np.arange(len(z)), knn)
    return normalized_edges(senders, nearest.ravel(), len(z))


def routing_entropy(probs) -> tuple[jax.Array, jax.Array]:
    """``(per-item entropy, usage entropy)`` of router probabilities (item, expert), both
    over ``log E`` (1 = uniform): ``mean_i H(p_i)`` and ``H(mean_i p_i)``."""
    log_e = jnp.log(probs.shape[-1])
    per_item = -(probs * jnp.log(probs + 1e-9)).sum(-1).mean() / log_e
    usage = probs.mean(0)
    return per_item, -(usage * jnp.log(usage + 1e-9)).sum() / log_e


class EntropyTrigger:
    """MAGNET's two-stage entropy weighting (form inferred): the loss carries
    ``sign * beta * H_item`` with ``sign = -1`` (coverage: per-item entropy rewarded) until
    the trigger fires, then ``+1`` (specialization: confident routing), next to a constant
    reward ``beta * H_usage`` for balanced expert use (see :func:`fit_bpr`). It fires at the first step
    ``>= min_step`` where the routing entropy's EMA has changed by less than ``tolerance``
    in one step (coverage has settled), and at ``max_step`` at the latest."""

    def __init__(self, *, min_step: int, max_step: int, tolerance: float, decay: float = 0.9):
        self.min_step, self.max_step = min_step, max_step
        self.tolerance, self.decay = tolerance, decay
        self.ema, self.fired_at = None, None

    def sign(self) -> float:
        return -1.0 if self.fired_at is None else 1.0

    def update(self, step: int, entropy: float) -> None:
        previous = self.ema
        self.ema = entropy if previous is None else (self.decay * previous
                                                     + (1 - self.decay) * entropy)
        if self.fired_at is not None:
            return
        flat = previous is not None and abs(self.ema - previous) < self.tolerance
        if step >= self.max_step or (step >= self.min_step and flat):
            self.fired_at = step


def bpr_batches(train, n_items: int, batch_size: int, rng):
    """``(users, items (batch, 2))``: a training pair and a uniformly drawn item the user
    has not interacted with in training (resampled until it is one)."""
    seen = np.unique(train[:, 0] * n_items + train[:, 1])
    idx = rng.integers(len(train), size=batch_size)
    users, pos = train[idx, 0], train[idx, 1]
    neg = rng.integers(n_items, size=batch_size)
    while (clash := np.isin(users * n_items + neg, seen)).any():
        neg[clash] = rng.integers(n_items, size=int(clash.sum()))
    return users, np.stack([pos, neg], 1)


def fit_bpr(model, graph: RecGraph, data: Interactions, *, steps: int, batch_size: int,
            learning_rate: float, weight_decay: float, seed: int, entropy_beta: float = 0.0,
            trigger: EntropyTrigger | None = None, compiler_options: dict | None = None):
    """Adam on ``-log sigmoid(s_pos - s_neg) + weight_decay * |scored embeddings|^2`` plus,
    for a routed model, ``entropy_beta * (sign * H_item - H_usage)`` (``sign`` from
    ``trigger``: per-item entropy first rewarded, then penalized; usage always balanced).
    Returns ``(params, trace)``: ``trace`` has per-step ``loss`` and, for a routed model,
    ``entropy``, ``usage_entropy`` and the ``trigger_step``. ``compiler_options`` go to
    ``jax.jit`` (e.g. a fast unoptimized compile for tiny smoke runs)."""
    users0, items0 = bpr_batches(data.train, data.n_items, 2, np.random.default_rng(seed))
    init = jax.jit(model.init, compiler_options=compiler_options)
    params = init(jax.random.key(seed), graph, users0, items0)["params"]
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    def loss_fn(params, users, items, sign):
        u, i, aux = model.apply({"params": params}, graph, method=model.embeddings)
        scores = jnp.einsum("bd,bkd->bk", u[users], i[items])
        reg = (u[users] ** 2).sum(-1).mean() + (i[items] ** 2).sum((-2, -1)).mean()
        loss = -jax.nn.log_sigmoid(scores[:, 0] - scores[:, 1]).mean() + weight_decay * reg
        stats = {"bpr": loss}
        if "router_probs" in aux:
            stats["entropy"], stats["usage_entropy"] = routing_entropy(aux["router_probs"])
            loss = loss + entropy_beta * (sign * stats["entropy"] - stats["usage_entropy"])
        return loss, stats

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(params, opt_state, users, items, sign):
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, users, items,
                                                                       sign)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    rng, trace = np.random.default_rng(seed + 1), {}
    for t in range(steps):
        users, items = bpr_batches(data.train, data.n_items, batch_size, rng)
        sign = trigger.sign() if trigger else 0.0
        params, opt_state, stats = step(params, opt_state, users, items, jnp.float32(sign))
        stats = {k: float(v) for k, v in stats.items()}
        if trigger and "entropy" in stats:
            trigger.update(t, stats["entropy"])
        for k, v in stats.items():
            trace.setdefault(k, []).append(v)
    if trigger:
        trace["trigger_step"] = trigger.fired_at
    return params, trace


def top_k_metrics(user_emb, item_emb, data: Interactions, k: int = 20) -> dict:
    """Recall@k and NDCG@k over users with test items, ranking all items the user has not
    trained on; ``*_tail``: the same with only long-tail test items as relevant (users
    without any skipped)."""
    scores = np.asarray(user_emb, np.float64) @ np.asarray(item_emb, np.float64).T
    scores[data.train[:, 0], data.train[:, 1]] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :k]
    relevant = np.zeros_like(scores, bool)
    relevant[data.test[:, 0], data.test[:, 1]] = True
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    out = {}
    for name, rel in (("", relevant), ("_tail", relevant & data.tail[None])):
        n_rel = rel.sum(1)
        users = n_rel > 0
        hits = np.take_along_axis(rel, top, axis=1)[users]
        ideal = np.array([discount[:min(n, k)].sum() for n in n_rel[users]])
        out[f"recall{name}"] = float((hits.sum(1) / n_rel[users]).mean())
        out[f"ndcg{name}"] = float(((hits * discount).sum(1) / ideal).mean())
    return out
