"""General-vs-domain evaluation for small decoders, and one tuning loop for any trainable part.

One task mixture holds the *general* tasks and one *domain* task (shared vocabulary); the
base decoder is pretrained on general data with a little domain data (``domain_share``),
then specialized on domain data only. :func:`evaluate` gives loss / token accuracy / exact
match on each side; :func:`tune` runs Adam on whatever ``loss(trainable, batch)`` closes
over (full weights, a LoRA adapter, a subset picked by ``peft_optimizer``), with an
optional ``every(step, trainable, opt_state) -> opt_state`` hook (importance-based learning
rates).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mechinterp.experiments.kit import lm
from mechinterp.experiments.kit.seeds import is_stat
from mechinterp.train.losses import next_token_terms
from mechinterp.train.tasks import mixture_from_config


# the smoke-preset keys of base_config's blocks (configs add their own on top)
SMOKE = {"seeds": 1, "data.num_train": 256, "data.num_test": 64, "model.d_model": 16,
         "model.n_layers": 2, "model.n_heads": 2, "model.d_mlp": 16,
         "pretrain.steps": 8, "pretrain.warmup_steps": 2}


def base_config(c: ml_collections.ConfigDict) -> None:
    """Set ``c.data``, ``c.model`` and ``c.pretrain`` in place: the general tasks (recall,
    chain), the domain task (3-term arith), a 4-layer decoder and its pretraining with 10 %
    domain rows. One base for the experiments that specialize the same pretrained decoder
    (configs/adept.py, configs/cofitune.py), so their results stay comparable."""
    c.data = ml_collections.ConfigDict()
    c.data.general = {"recall": {}, "chain": {"n_symbols": 12, "length": 3}}
    c.data.domain = {"arith": {"n_terms": 3, "max_value": 9}}
    c.data.knowledge = {"n_entities": 24, "n_relations": 3}
    c.data.seq_len = 20
    c.data.num_train = 6000
    c.data.num_test = 600

    c.model = lm.model_block(n_layers=4)
    c.pretrain = lm.train_block(steps=800)
    c.pretrain.domain_share = 0.1  # fraction of pretraining rows from the domain task


@dataclasses.dataclass
class DomainData:
    """Token arrays of the general and domain sides, train and test."""

    mixture: object
    general_train: lm.Examples
    domain_train: lm.Examples
    general_test: lm.Examples
    domain_test: lm.Examples
    vocab_size: int


def _split(ex: lm.Examples, domain_index: int):
    return (lm.Examples(ex.tokens[ex.task != domain_index], ex.loss_mask[ex.task != domain_index],
                        ex.task[ex.task != domain_index], ex.real[ex.task != domain_index],
                        ex.task_names),
            ex.of_task(domain_index))


def make_domain_data(config) -> DomainData:
    """``config.data``: ``general`` / ``domain`` task dicts (one domain task), ``knowledge``,
    ``seq_len``, ``num_train``, ``num_test``; seeded by ``config.seed``."""
    d = config.data
    if len(d.domain) != 1:
        raise ValueError(f"config.data.domain must hold one task, got {list(d.domain)}")
    tasks = {**d.general.to_dict(), **d.domain.to_dict()}
    mixture = mixture_from_config(tasks, knowledge=d.knowledge.to_dict(), seq_len=d.seq_len,
                                  seed=config.seed)
    domain_index = list(tasks).index(next(iter(d.domain)))
    train = lm.examples(mixture, "train", d.num_train)
    test = lm.examples(mixture, "test", d.num_test)
    gtr, dtr = _split(train, domain_index)
    gte, dte = _split(test, domain_index)
    return DomainData(mixture, gtr, dtr, gte, dte, len(mixture.tokenizer().vocab))


def batches(data: lm.Examples, batch_size: int, seed: int, share=None):
    """Endless shuffled batches ``{"tokens", "loss_mask"}``; ``share=(other, p)`` swaps in a
    fraction ``p`` of rows from ``other``."""
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.integers(0, len(data.tokens), batch_size)
        tokens, mask = data.tokens[rows], data.loss_mask[rows]
        if share is not None:
            other, p = share
            swap = rng.random(batch_size) < p
            alt = rng.integers(0, len(other.tokens), batch_size)
            tokens = np.where(swap[:, None], other.tokens[alt], tokens)
            mask = np.where(swap[:, None], other.loss_mask[alt], mask)
        yield {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}


def rows(ex: lm.Examples, n: int, offset: int = 0) -> dict:
    """A fixed batch: rows ``offset * n ... offset * n + n - 1`` (wrapping) of ``ex``."""
    idx = (np.arange(n) + offset * n) % len(ex.tokens)
    return {"tokens": jnp.asarray(ex.tokens[idx]), "loss_mask": jnp.asarray(ex.loss_mask[idx])}


def lm_loss(apply):
    """``loss(params, batch)``: mean next-token cross entropy on the targets."""
    def loss(params, batch):
        t = next_token_terms(apply(params, batch["tokens"]), batch)
        return t["loss"] / jnp.maximum(t["weight"], 1.0)
    return loss


@functools.cache
def _stepper(loss, tx):
    @jax.jit
    def step(p, state, batch):
        value, grads = jax.value_and_grad(loss)(p, batch)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value
    return step


def tune(loss, trainable, tx: optax.GradientTransformation, data_iter, steps: int,
         every=None, every_n: int = 0, prepare=None):
    """``(trainable, losses, seconds)`` after ``steps`` steps of ``tx`` on ``loss``; the
    step is compiled once per ``(loss, tx)`` pair, so runs that differ only in optimizer
    state values (``prepare(state) -> state``, e.g. new gradient masks) share it."""
    step = _stepper(loss, tx)
    state, losses = tx.init(trainable), []
    if prepare is not None:
        state = prepare(state)
    start = time.perf_counter()
    for i in range(steps):
        if every is not None and every_n and i % every_n == 0:
            state = every(i, trainable, state)
        trainable, state, value = step(trainable, state, next(data_iter))
        losses.append(value)
    losses = np.asarray(jax.device_get(jnp.stack(losses))) if losses else np.zeros(0)
    return trainable, losses, time.perf_counter() - start


def revert_sweep(loss_fn, tuned, base):
    """Loss increase when each layer of the tuned (scanned) model gets the base weights
    back: a patching sweep over layers, compiled once per ``loss_fn``."""
    return np.asarray(_revert(loss_fn)(tuned, base))


@functools.cache
def _revert(loss_fn):
    @jax.jit
    def sweep(tuned, base):
        n = jax.tree.leaves(tuned["layers"])[0].shape[0]

        def reverted(i):
            layers = jax.tree.map(lambda t, b: jnp.where(
                (jnp.arange(n) == i).reshape((n,) + (1,) * (t.ndim - 1)), b, t),
                tuned["layers"], base["layers"])
            return loss_fn({**tuned, "layers": layers})
        return jax.lax.map(reverted, jnp.arange(n)) - loss_fn(tuned)
    return sweep


def evaluate(apply, params, data: DomainData) -> dict:
    """Loss, token accuracy and exact match on the general and domain test sets."""
    out = {}
    for side, ex in (("general", data.general_test), ("domain", data.domain_test)):
        m = lm.metrics_from_logits(apply(params, jnp.asarray(ex.tokens)), ex)["all"]
        out[side] = m
    return out


def clear_gain(x) -> bool:
    """A gain larger than its spread over seeds (``mean - sd > 0``)."""
    return x["mean"] - x["std"] > 0 if is_stat(x) else x > 0
