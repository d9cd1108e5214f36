"""A seeded family of synthetic token tasks, mixed by task tokens.

Every example is ``<bos> <task-token> prompt... target... <eos> <pad>...``; the loss mask
marks the target words and ``<eos>``. A :class:`TaskMixture` fixes the tasks, their
weights, a shared :class:`KnowledgeBase`, the sequence length and the seed; example ``i``
depends only on those and ``i``, so datasets are reproducible in any order.

Tasks: :class:`FactRecall` (``<recall> e5 r2 = e17``), :class:`MultiHop` (compose facts),
:class:`InContextChain` (follow a chain given as shuffled edges in context) and
:class:`Arithmetic` (digit-by-digit addition and subtraction); optional scratchpads and
held-out combinations.

Design notes (each task's format and options): docs/training.md ("Synthetic token tasks").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from mechinterp.train.tokenizer import BOS, EOS, WordTokenizer

SPLITS = ("train", "test")
PUNCTUATION = ("=", ";", ">", "?", "+", "-")
DIGITS = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
    """``n_entities`` entities (``e0``...), ``n_relations`` relations (``r0``...); each
    (entity, relation) has one object entity, drawn from the mixture's seed."""

    n_entities: int = 32
    n_relations: int = 4

    def entities(self) -> list[str]:
        return [f"e{i}" for i in range(self.n_entities)]

    def relations(self) -> list[str]:
        return [f"r{i}" for i in range(self.n_relations)]

    def table(self, seed: int) -> np.ndarray:
        """(n_entities, n_relations) object entity ids."""
        rng = np.random.default_rng([seed, 0])
        return rng.integers(0, self.n_entities, (self.n_entities, self.n_relations))


@dataclasses.dataclass(frozen=True)
class FactRecall:
    name = "recall"

    def words(self, kb: KnowledgeBase) -> list[str]:
        return kb.entities() + kb.relations()

    def max_words(self) -> int:
        return 4  # e r = e

    def sample(self, rng, table: np.ndarray, split: str, seed: int):
        del split, seed
        e, r = rng.integers(table.shape[0]), rng.integers(table.shape[1])
        return [f"e{e}", f"r{r}", "="], [f"e{table[e, r]}"]


@dataclasses.dataclass(frozen=True)
class MultiHop:
    hops: int = 2
    scratchpad: bool = True
    holdout: float = 0.2
    name = "hop"

    def __post_init__(self):
        if self.hops < 1 or not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"MultiHop needs hops >= 1 and 0 <= holdout < 1, got {self}")

    def words(self, kb: KnowledgeBase) -> list[str]:
        return kb.entities() + kb.relations()

    def max_words(self) -> int:
        return 1 + self.hops + 1 + (2 * (self.hops - 1) if self.scratchpad else 0) + 1

    def _held_out(self, table: np.ndarray, seed: int) -> np.ndarray:
        """Boolean (entity, relation chain index) mask of test-only combinations."""
        n_e, n_r = table.shape
        rng = np.random.default_rng([seed, 1, self.hops])
        held = rng.random((n_e, n_r ** self.hops)) < self.holdout
        if self.holdout > 0 and not held.any():
            held.flat[rng.integers(held.size)] = True
        return held

    def sample(self, rng, table: np.ndarray, split: str, seed: int):
        n_e, n_r = table.shape
        held = self._held_out(table, seed)
        if self.holdout == 0:  # no held-out set: both splits draw from every combination
            candidates = np.arange(held.size)
        else:
            candidates = np.flatnonzero(held if split == "test" else ~held)
        if candidates.size == 0:
            raise ValueError(f"{self} leaves no combinations for split {split!r}")
        e, chain = divmod(int(rng.choice(candidates)), n_r ** self.hops)
        relations = [(chain // n_r ** k) % n_r for k in range(self.hops)]
        entity, steps = e, []
        for r in relations:
            entity = table[entity, r]
            steps.append(f"e{entity}")
        prompt = [f"e{e}", *(f"r{r}" for r in relations), "="]
        target = ([w for s in steps[:-1] for w in (s, ";")] if self.scratchpad else [])
        return prompt, target + [steps[-1]]


@dataclasses.dataclass(frozen=True)
class InContextChain:
    n_symbols: int = 16
    length: int = 4
    scratchpad: bool = True
    holdout: float = 0.0
    distractors: int = 0
    name = "chain"

    def __post_init__(self):
        if not 2 <= self.length <= self.n_symbols // (1 + self.distractors):
            raise ValueError(f"InContextChain needs 2 <= length <= n_symbols / (1 + "
                             f"distractors), got {self}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"InContextChain needs 0 <= holdout < 1, got {self}")

    def held_out(self, seed: int) -> np.ndarray:
        """Boolean (start symbol, end symbol) mask of test-only premise combinations."""
        rng = np.random.default_rng([seed, 2, self.length])
        held = rng.random((self.n_symbols, self.n_symbols)) < self.holdout
        np.fill_diagonal(held, False)  # a chain never ends where it starts
        if self.holdout > 0 and not held.any():
            held[0, 1] = True
        return held

    def chains(self, rng, split: str, seed: int) -> list[list[int]]:
        """The symbol ids of the queried chain of ``split`` and of the ``distractors``
        chains (disjoint symbols), queried chain first; rejection-sampled against the
        held-out (start, end) combinations when ``holdout > 0``."""
        n = self.length * (1 + self.distractors)
        held = self.held_out(seed) if self.holdout > 0 else None
        while True:
            symbols = [int(i) for i in rng.permutation(self.n_symbols)[:n]]
            chains = [symbols[k:k + self.length] for k in range(0, n, self.length)]
            if held is None or held[chains[0][0], chains[0][-1]] == (split == "test"):
                return chains

    def words(self, kb: KnowledgeBase) -> list[str]:
        del kb
        return [f"s{i}" for i in range(self.n_symbols)]

    def max_words(self) -> int:
        edges = (self.length - 1) * (1 + self.distractors)
        return 4 * edges + 3 + (self.length - 1 if self.scratchpad else 1)

    def sample(self, rng, table: np.ndarray, split: str, seed: int):
        del table
        chains = [[f"s{i}" for i in c] for c in self.chains(rng, split, seed)]
        chain = chains[0]
        edges = [[a, ">", b, ";"] for c in chains for a, b in zip(c, c[1:])]
        order = rng.permutation(len(edges))
        prompt = [w for i in order for w in edges[i]] + ["?", chain[0], "="]
        return prompt, (chain[1:] if self.scratchpad else chain[-1:])


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    n_terms: int = 3
    max_value: int = 20
    scratchpad: bool = True
    name = "arith"

    def __post_init__(self):
        if self.n_terms < 2 or self.max_value < 1:
            raise ValueError(f"Arithmetic needs n_terms >= 2 and max_value >= 1, got {self}")

    def words(self, kb: KnowledgeBase) -> list[str]:
        del kb
        return list(DIGITS)

    def max_words(self) -> int:
        digits = len(str(self.max_value))
        total = len(str(self.max_value * self.n_terms)) + 1  # a sign
        steps = (self.n_terms - 1) if self.scratchpad else 1
        return self.n_terms * (digits + 1) + steps * (total + 1)

    def sample(self, rng, table: np.ndarray, split: str, seed: int):
        del table, split, seed
        values = rng.integers(0, self.max_value + 1, self.n_terms)
        ops = rng.choice(["+", "-"], self.n_terms - 1)
        prompt, totals, total = list(str(values[0])), [], int(values[0])
        for op, v in zip(ops, values[1:]):
            prompt += [op, *str(v)]
            total = total + int(v) if op == "+" else total - int(v)
            totals.append(total)
        prompt.append("=")
        shown = totals if self.scratchpad else totals[-1:]
        target = []
        for i, t in enumerate(shown):
            target += (["-"] if t < 0 else []) + list(str(abs(t)))
            if i < len(shown) - 1:
                target.append(";")
        return prompt, target


TASKS = {cls.name: cls for cls in (FactRecall, MultiHop, InContextChain, Arithmetic)}
Task = FactRecall | MultiHop | InContextChain | Arithmetic


def task_token(task) -> str:
    return f"<{task.name}>"


@dataclasses.dataclass(frozen=True)
class TaskMixture:
    """Tasks with sampling weights, a shared knowledge base, a sequence length and a seed."""

    tasks: tuple[tuple[Task, float], ...]
    knowledge: KnowledgeBase = KnowledgeBase()
    seq_len: int = 32
    seed: int = 0

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a TaskMixture needs at least one (task, weight)")
        names = [task.name for task, _ in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"each task may appear once in a mixture, got {names}")
        if any(w <= 0 for _, w in self.tasks):
            raise ValueError(f"task weights must be positive, got {self.tasks}")
        need = max(task.max_words() for task, _ in self.tasks) + 3  # bos, task, eos
        if need > self.seq_len:
            longest = max(self.tasks, key=lambda tw: tw[0].max_words())[0]
            raise ValueError(
                f"seq_len={self.seq_len} is too short: task {longest} needs up to {need} "
                "tokens; raise seq_len or shrink the task"
            )

    def tokenizer(self) -> WordTokenizer:
        """The vocabulary of this mixture: specials, task tokens, punctuation, digits and
        each task's words (fixed order, so ids are stable)."""
        words = [task_token(t) for t, _ in self.tasks] + list(PUNCTUATION) + list(DIGITS)
        for task, _ in self.tasks:
            words += task.words(self.knowledge)
        return WordTokenizer(dict.fromkeys(words))

    def example(self, split: str, index: int, tokenizer: WordTokenizer | None = None,
                table: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Example ``index`` of ``split``: ``tokens``, ``loss_mask`` (int32, ``seq_len``)
        and ``task`` (index into ``tasks``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        tokenizer = tokenizer or self.tokenizer()
        table = self.knowledge.table(self.seed) if table is None else table
        rng = np.random.default_rng([self.seed, SPLITS.index(split) + 1, index])
        weights = np.asarray([w for _, w in self.tasks], np.float64)
        which = int(rng.choice(len(self.tasks), p=weights / weights.sum()))
        task = self.tasks[which][0]
        prompt, target = task.sample(rng, table, split, self.seed)
        words = [BOS, task_token(task), *prompt, *target, EOS]
        n_prompt = 2 + len(prompt)
        tokens = np.full(self.seq_len, tokenizer.pad_id, np.int32)
        tokens[: len(words)] = tokenizer.encode(words)
        loss_mask = np.zeros(self.seq_len, np.int32)
        loss_mask[n_prompt: len(words)] = 1
        return {"tokens": tokens, "loss_mask": loss_mask, "task": np.int32(which)}

    def examples(self, split: str, n: int) -> Iterator[dict[str, np.ndarray]]:
        """Examples ``0 .. n-1`` of ``split``."""
        tokenizer, table = self.tokenizer(), self.knowledge.table(self.seed)
        for i in range(n):
            yield self.example(split, i, tokenizer, table)


def mixture_from_config(tasks: dict, *, knowledge: dict | None = None, seq_len: int = 32,
                        seed: int = 0) -> TaskMixture:
    """A :class:`TaskMixture` from plain data: ``tasks`` maps task names (``recall``,
    ``hop``, ``chain``, ``arith``) to their fields plus ``weight`` (default 1)."""
    built = []
    for name, fields in tasks.items():
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; tasks are {sorted(TASKS)}")
        fields = dict(fields or {})
        weight = fields.pop("weight", 1.0)
        allowed = {f.name for f in dataclasses.fields(TASKS[name])}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(
                f"task {name!r} has no field(s) {unknown}; its fields are "
                f"{sorted(allowed) + ['weight']}"
            )
        built.append((TASKS[name](**fields), float(weight)))
    return TaskMixture(tuple(built), KnowledgeBase(**(knowledge or {})), seq_len, seed)


def decode_example(example: dict, tokenizer: WordTokenizer) -> tuple[str, str]:
    """``(prompt, target)`` text of one example (for reading and debugging)."""
    tokens, mask = np.asarray(example["tokens"]), np.asarray(example["loss_mask"]) > 0
    real = tokens != tokenizer.pad_id
    return tokenizer.decode(tokens[real & ~mask]), tokenizer.decode(tokens[mask])

