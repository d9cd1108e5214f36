"""The program teacher's text and the generic task mixture, on one shared vocabulary.

The teacher is a program: :class:`~mechinterp.train.tasks.Arithmetic` with ``scratchpad``
writes every running total (the chain of thought, ``3 + 5 - 2 = 8 ; 6``), without it only
the final total (answer-only). The generic tasks (fact recall and in-context chains,
:mod:`mechinterp.train.tasks`) are what the base student learns first and what
specialization may cost it. One tokenizer covers every mixture, so the base, the teacher
and every student share token ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mechinterp.experiments.kit.lm import Examples
from mechinterp.train.tasks import TaskMixture, mixture_from_config
from mechinterp.train.tokenizer import EOS, WordTokenizer


@dataclasses.dataclass
class Mixtures:
    generic: TaskMixture
    answer_only: TaskMixture
    cot: TaskMixture
    tokenizer: WordTokenizer
    table: np.ndarray


def make_mixtures(config) -> Mixtures:
    d = config.data
    arith = {"n_terms": d.n_terms, "max_value": d.max_value}
    knowledge = {"n_entities": d.n_entities, "n_relations": d.n_relations}
    generic_tasks = {"recall": {}, "chain": {"n_symbols": d.n_symbols, "length": d.chain_length}}

    def mixture(tasks):
        return mixture_from_config(tasks, knowledge=knowledge, seq_len=d.seq_len, seed=config.seed)

    every = mixture({**generic_tasks, "arith": arith})
    return Mixtures(generic=mixture(generic_tasks),
                    answer_only=mixture({"arith": {**arith, "scratchpad": False}}),
                    cot=mixture({"arith": {**arith, "scratchpad": True}}),
                    tokenizer=every.tokenizer(), table=every.knowledge.table(config.seed))


def encode(m: Mixtures, mixture: TaskMixture, split: str, n: int) -> Examples:
    """``n`` examples of ``split`` in the shared vocabulary."""
    rows = [mixture.example(split, i, m.tokenizer, m.table) for i in range(n)]
    tokens = np.stack([r["tokens"] for r in rows])
    return Examples(tokens=tokens, loss_mask=np.stack([r["loss_mask"] for r in rows]),
                    task=np.asarray([r["task"] for r in rows]),
                    real=tokens != m.tokenizer.pad_id,
                    task_names=tuple(t.name for t, _ in mixture.tasks))


def source(data: Examples, **extra) -> list[dict]:
    """A random-access training source (one dict per example) for ``fit``."""
    return [{"tokens": data.tokens[i], "loss_mask": data.loss_mask[i],
             **{k: v[i] for k, v in extra.items()}} for i in range(len(data.tokens))]


def split_prompt(data: Examples) -> tuple[list[np.ndarray], list[list[int]]]:
    """Each example's prompt ids (up to its first target) and its target ids (to ``<eos>``)."""
    prompts, targets = [], []
    for tokens, mask in zip(data.tokens, data.loss_mask):
        where = np.flatnonzero(mask)
        prompts.append(tokens[: where[0]])
        targets.append(tokens[where].tolist())
    return prompts, targets


def final_answer(words: list[str]) -> list[str]:
    """The words after the last ``;`` and before ``<eos>``: the final total of either
    format."""
    words = words[: words.index(EOS)] if EOS in words else words
    return words[len(words) - words[::-1].index(";"):] if ";" in words else words
