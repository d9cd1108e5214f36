"""Small decoders on synthetic task mixtures: data, families, training, evaluation.

What the language-model reproductions share: their config blocks (:func:`base_config`),
the tfds task mixture of a config (:func:`make_data`), decoder families (:data:`FAMILIES`, :func:`decoder`),
:func:`train_decoder` (one family and seed, via
:func:`~mechinterp.experiments.kit.train.train_or_reuse`), jitted logits and
teacher-forced metrics per task.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mechinterp.experiments.kit.train import Trained, train_config, train_or_reuse
from mechinterp.models import Decoder
from mechinterp.train.data import build_synthetic
from mechinterp.train.loop import decoder_config
from mechinterp.train.losses import next_token_terms
from mechinterp.train.tasks import TaskMixture, mixture_from_config

FAMILIES = {
    # LLaMA: no attention biases, RoPE theta 1e4. Qwen2: q/k/v biases, RoPE theta 1e6.
    "llama": {"qkv_bias": False, "rope_theta": 10_000.0},
    "qwen": {"qkv_bias": True, "rope_theta": 1_000_000.0},
}


# the smoke-preset keys of base_config's blocks (configs add their own on top)
SMOKE = {"seeds": 1, "data.knowledge.n_entities": 8, "data.knowledge.n_relations": 2,
         "data.num_train": 256, "data.num_test": 64, "model.d_model": 16, "model.n_layers": 2,
         "model.n_heads": 2, "model.d_mlp": 16, "train.steps": 8, "train.warmup_steps": 2}


def base_config(c: ml_collections.ConfigDict, tasks: dict, n_layers: int) -> None:
    """Set ``c.data`` (``tasks`` over a 24-entity knowledge base, 20 tokens, 8192 train /
    512 test examples), ``c.model`` (d_model 64, ``n_layers``, 4 heads, d_mlp 128) and
    ``c.train`` (1000 steps of 32, learning rate 1e-2 after 50 warmup steps) in place: the
    decoder the analysis reproductions train (configs/bricks.py, llm_drop.py,
    depth_efficiency.py)."""
    c.data = ml_collections.ConfigDict()
    c.data.tasks = tasks
    c.data.knowledge = {"n_entities": 24, "n_relations": 3}
    c.data.seq_len = 20
    c.data.num_train = 8192
    c.data.num_test = 512

    c.model = model_block(n_layers)
    c.train = train_block(steps=1000)


def model_block(n_layers: int) -> ml_collections.ConfigDict:
    """The small decoder of the LM reproductions: d_model 64, ``n_layers``, 4 heads,
    d_mlp 128."""
    return ml_collections.ConfigDict(
        {"d_model": 64, "n_layers": n_layers, "n_heads": 4, "d_mlp": 128})


def train_block(steps: int, batch_size: int = 32) -> ml_collections.ConfigDict:
    """Its training recipe: ``steps`` of ``batch_size``, learning rate 1e-2 after 50
    warmup steps (``kit.train_config``'s short form)."""
    return ml_collections.ConfigDict({"steps": steps, "batch_size": batch_size,
                                      "learning_rate": 1e-2, "warmup_steps": 50})


def families(spec: str) -> list[str]:
    """``"llama,qwen"`` -> ``["llama", "qwen"]``; an unknown family is an error."""
    names = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    return names


def decoder(model: dict, family: str, vocab_size: int) -> Decoder:
    """A :class:`~mechinterp.models.Decoder` of ``family`` with ``model``'s sizes."""
    return Decoder(decoder_config({**dict(model), **FAMILIES[family],
                                   "vocab_size": vocab_size}, vocab_size))


def make_mixture(config) -> TaskMixture:
    """The mixture of ``config.data.tasks`` / ``knowledge`` / ``seq_len``, seeded by
    ``config.seed``."""
    d = config.data
    return mixture_from_config(d.tasks.to_dict(), knowledge=d.knowledge.to_dict(),
                               seq_len=d.seq_len, seed=config.seed)


def build_data(mixture: TaskMixture, config, workdir: Path):
    """The tfds builder of ``mixture`` under ``workdir/data``."""
    return build_synthetic(mixture, num_train=config.data.num_train,
                           num_test=config.data.num_test, data_dir=Path(workdir) / "data")


def make_data(config, workdir: Path):
    """``(mixture, tfds builder)`` of the config's task mixture under ``workdir/data``."""
    mixture = make_mixture(config)
    return mixture, build_data(mixture, config, workdir)


def train_decoder(config, family: str, builder, vocab_size: int, folder: Path, *,
                  seed: int | None = None, model: dict | None = None) -> Trained:
    """Train (or reuse) a ``family`` decoder in ``folder`` on the builder's train split.

    ``config``: an experiment config with ``model``, ``train`` (``steps``,
    ``batch_size``, ``learning_rate``, ``warmup_steps``), ``data``, ``seed``,
    ``progress`` and ``retrain``; ``seed`` (default ``config.seed``) is the training seed;
    ``model`` overrides ``config.model`` fields."""
    module = decoder({**config.model.to_dict(), **(model or {})}, family, vocab_size)
    t = train_config(config.train, seed=config.seed if seed is None else seed,
                     progress=config.get("progress", False))
    return train_or_reuse(module, builder.as_data_source("train"), t, folder,
                          data_spec=config.data.to_dict(),
                          retrain=config.get("retrain", False))


@functools.cache
def _jitted_apply(model):
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def logits_of(model, params, tokens):
    """The model's logits, jitted (eager ``apply`` of a scanned decoder is slow)."""
    return _jitted_apply(model)(params, jnp.asarray(tokens))


def answer_accuracy(model, params, tokens, answers) -> float:
    """Top-1 accuracy of the prediction at the last position."""
    logits = logits_of(model, params, tokens)
    return float(np.mean(np.asarray(logits[:, -1].argmax(-1)) == answers))


@dataclasses.dataclass
class Examples:
    """Test examples: ``tokens``, ``loss_mask`` (targets), ``task`` (index into
    ``task_names``) and ``real`` (non-padding positions)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    task: np.ndarray
    real: np.ndarray
    task_names: tuple[str, ...]

    def of_task(self, index: int) -> "Examples":
        rows = self.task == index
        return Examples(self.tokens[rows], self.loss_mask[rows], self.task[rows],
                        self.real[rows], self.task_names)


def examples(mixture: TaskMixture, split: str, n: int) -> Examples:
    rows = list(mixture.examples(split, n))
    tokens = np.stack([r["tokens"] for r in rows])
    return Examples(tokens=tokens, loss_mask=np.stack([r["loss_mask"] for r in rows]),
                    task=np.asarray([r["task"] for r in rows]),
                    real=tokens != mixture.tokenizer().pad_id,
                    task_names=tuple(t.name for t, _ in mixture.tasks))


def metrics_from_logits(logits, data: Examples) -> dict:
    """Target loss, token accuracy and exact match (all targets right), overall and per
    task, from teacher-forced logits."""
    out = {}
    groups = [("all", np.ones(len(data.task), bool))] + [
        (name, data.task == i) for i, name in enumerate(data.task_names)]
    for name, rows in groups:
        if not rows.any():
            continue
        t = jax.device_get(next_token_terms(jnp.asarray(logits)[rows], {
            "tokens": jnp.asarray(data.tokens[rows]),
            "loss_mask": jnp.asarray(data.loss_mask[rows])}))
        out[name] = {"loss": float(t["loss"] / t["weight"]),
                     "token_acc": float(t["correct"] / t["weight"]),
                     "exact": float(t["exact"] / t["sequences"])}
    return out


def lm_metrics(model, params, data: Examples) -> dict:
    return metrics_from_logits(logits_of(model, params, data.tokens), data)


def hop_prompts(mixture: TaskMixture, queries) -> tuple[list[list[str]], np.ndarray,
                                                        np.ndarray]:
    """Fact-composition prompts ``<bos> <hop> e r_a r_b ... =`` in the format of the
    mixture's multi-hop task, one per query ``(entity, relations)`` (an entity index and
    relation names, e.g. ``(5, ("r0", "r1"))``: "r1 of r0 of e5"). Returns the words, the
    token ids (n, length) and each prompt's answer token (the entity reached by following
    the relations in the mixture's knowledge table)."""
    tokenizer = mixture.tokenizer()
    table = mixture.knowledge.table(mixture.seed)
    words, answers = [], []
    for entity, relations in queries:
        words.append(["<bos>", "<hop>", f"e{entity}", *relations, "="])
        for relation in relations:
            entity = table[entity, int(relation[1:])]
        answers.append(tokenizer.encode([f"e{entity}"])[0])
    tokens = np.stack([tokenizer.encode(w) for w in words]).astype(np.int32)
    return words, tokens, np.asarray(answers)
