"""The puzzles: recall and in-context reasoning prompts with corrupted twins.

- *recall* ``<recall> e5 r2 = e17``: a knowledge-base fact (entity, relation -> entity),
  memorized in training and never in the prompt; the twin changes the entity (to one whose
  fact has another answer).
- *reasoning* ``<chain> s7 > s1 ; s3 > s7 ; ? s3 = s7 s1``: premises in the prompt (the
  shuffled edges of a chain of fresh symbols, optionally with distractor chains); the
  answer needs ``length - 1`` (>= 2) in-context hops. With ``scratchpad`` the intermediate
  steps are written out and the prompt ends before the last one, so the analysed
  prediction is the chain's final hop. The twin changes the last premise's object to a
  symbol not in the prompt, so the answer changes and every other premise stays. A
  ``holdout`` share of (start, end) combinations is test-only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mechinterp.train.tasks import SPLITS, TaskMixture, mixture_from_config, task_token
from mechinterp.train.tokenizer import BOS

TASKS = ("recall", "reasoning")
MIXTURE_NAMES = {"recall": "recall", "reasoning": "chain"}  # our name -> TaskMixture task


def make_mixture(config) -> TaskMixture:
    d = config.data
    return mixture_from_config(
        {"recall": {},
         "chain": {"n_symbols": d.n_symbols, "length": d.chain_length, "scratchpad": d.scratchpad,
                   "holdout": d.holdout, "distractors": d.distractors,
                   "weight": d.chain_weight}},
        knowledge={"n_entities": d.n_entities, "n_relations": d.n_relations},
        seq_len=d.seq_len, seed=config.seed)


@dataclasses.dataclass
class Twins:
    """``n`` prompt pairs of one task, all of one length; the answer is predicted at the
    last position. ``changed`` is the one position where ``clean`` and ``corrupt``
    differ; ``words`` are the first clean prompt's words (for plot labels)."""

    task: str
    clean: np.ndarray  # (n, length) int32
    corrupt: np.ndarray
    clean_answer: np.ndarray  # (n,) int32 token ids
    corrupt_answer: np.ndarray
    changed: np.ndarray  # (n,) int32
    words: list[str]


def _task(mixture: TaskMixture, name: str):
    for task, _ in mixture.tasks:
        if task.name == name:
            return task
    raise KeyError(name)


def _recall_pair(rng, table):
    n_e, n_r = table.shape
    while True:
        e, r, e2 = int(rng.integers(n_e)), int(rng.integers(n_r)), int(rng.integers(n_e))
        if table[e, r] != table[e2, r]:
            break
    prompt = [f"e{e}", f"r{r}", "="]
    return prompt, 0, f"e{table[e, r]}", f"e{e2}", f"e{table[e2, r]}"


def _chain_pair(rng, task, split, seed):
    chains = task.chains(rng, split, seed)
    used = {s for c in chains for s in c}
    fresh = [s for s in range(task.n_symbols) if s not in used]
    if not fresh:
        raise ValueError(f"{task} uses every symbol; a corrupted twin needs a spare one")
    new_end = int(rng.choice(fresh))
    words = [[f"s{i}" for i in c] for c in chains]
    edges = [[a, ">", b, ";"] for c in words for a, b in zip(c, c[1:])]
    order = [int(i) for i in rng.permutation(len(edges))]
    prompt = [w for i in order for w in edges[i]] + ["?", words[0][0], "="]
    if task.scratchpad:  # the intermediate steps are given; the last one is asked for
        prompt += words[0][1:-1]
    last_edge = order.index(len(words[0]) - 2)  # the queried chain's last premise
    changed = 4 * last_edge + 2
    return prompt, changed, words[0][-1], f"s{new_end}", f"s{new_end}"


def make_twins(mixture: TaskMixture, task: str, split: str, n: int, seed: int) -> Twins:
    """``n`` clean/corrupted prompt pairs of ``task`` ("recall" or "reasoning") from
    ``split``, deterministic given the mixture, ``split``, ``n`` and ``seed``."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be in {TASKS} and split in {SPLITS}; got {task}, {split}")
    tokenizer, table = mixture.tokenizer(), mixture.knowledge.table(mixture.seed)
    spec = _task(mixture, MIXTURE_NAMES[task])
    rng = np.random.default_rng([seed, 17, TASKS.index(task), SPLITS.index(split)])
    head = [BOS, task_token(spec)]
    rows = {k: [] for k in ("clean", "corrupt", "clean_answer", "corrupt_answer", "changed")}
    words = None
    for _ in range(n):
        if task == "recall":
            prompt, changed, answer, new_word, new_answer = _recall_pair(rng, table)
        else:
            prompt, changed, answer, new_word, new_answer = _chain_pair(rng, spec, split,
                                                                        mixture.seed)
        corrupt = list(prompt)
        corrupt[changed] = new_word
        words = words or head + prompt
        rows["clean"].append(tokenizer.encode(head + prompt))
        rows["corrupt"].append(tokenizer.encode(head + corrupt))
        rows["clean_answer"].append(tokenizer.encode([answer])[0])
        rows["corrupt_answer"].append(tokenizer.encode([new_answer])[0])
        rows["changed"].append(changed + len(head))
    arrays = {k: np.asarray(v, np.int32) for k, v in rows.items()}
    return Twins(task=task, words=words, **arrays)
