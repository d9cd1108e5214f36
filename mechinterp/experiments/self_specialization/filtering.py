"""Filtering generated (instruction, answer) pairs, as in Self-Instruct / Self-Specialization.

A pair is dropped, with the first reason that applies, when: its instruction is malformed
(empty, not one line, not a question ending in "?", prompt markers left in) or its length
is outside the word bounds; its answer is malformed (empty, markers, no complete sentence)
or too long; its instruction repeats an earlier one (after normalization); or its
instruction's ROUGE-L F1 with a seed or an already kept instruction reaches
``max_rouge`` (Self-Instruct keeps a new instruction only when ROUGE-L < 0.7). ROUGE-L
is taken over content words: every question here shares "What does ... do?", which alone
would make two questions about different functions 0.6-0.8 similar.
"""

from __future__ import annotations

from collections.abc import Sequence

from mechinterp.experiments.self_specialization.data import STOP, words

MARKERS = ("<|im_start|>", "<|im_end|>", "Q:", "A:", "Reference:")
REASONS = ("empty", "format", "length", "duplicate", "similar")


def rouge_l(candidate: str, reference: str, content_only: bool = False) -> float:
    """ROUGE-L F1 = 2 P R / (P + R), with P = LCS / |candidate| and R = LCS / |reference|
    over :func:`~.data.words` tokens (Lin 2004); ``content_only`` drops stop words."""
    a, b = words(candidate), words(reference)
    if content_only:
        a, b = [w for w in a if w not in STOP], [w for w in b if w not in STOP]
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def instruction_problem(text: str, min_words: int, max_words: int) -> str | None:
    if not text.strip():
        return "empty"
    if "\n" in text.strip() or any(m in text for m in MARKERS) or not text.strip().endswith("?"):
        return "format"
    if not min_words <= len(text.split()) <= max_words:
        return "length"
    return None


def answer_problem(text: str, min_words: int, max_words: int) -> str | None:
    if not text.strip():
        return "empty"
    if any(m in text for m in MARKERS) or not text.strip().endswith((".", "!")):
        return "format"
    if not min_words <= len(text.split()) <= max_words:
        return "length"
    return None


def filter_pairs(pairs: Sequence[tuple[str, str]], seeds: Sequence[str], *, max_rouge: float,
                 instruction_words=(3, 30), answer_words=(3, 40)):
    """``(kept pairs, {reason: count})`` (every reason listed, 0 included, so seeds
    aggregate); reasons: empty, format, length (instruction or
    answer), duplicate, similar (ROUGE-L with a seed or kept instruction >= max_rouge). An
    answer ``None`` is not checked (instructions filtered before they are answered)."""
    kept, dropped, seen = [], dict.fromkeys(REASONS, 0), set()
    pool = list(seeds)
    for instruction, answer in pairs:
        reason = instruction_problem(instruction, *instruction_words)
        if reason is None and answer is not None:
            reason = answer_problem(answer, *answer_words)
        key = " ".join(words(instruction))
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is None and any(rouge_l(instruction, s, True) >= max_rouge
                                     for s in pool):
            reason = "similar"
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(key)
        pool.append(instruction)
        kept.append((instruction.strip(), answer if answer is None else answer.strip()))
    return kept, dropped
