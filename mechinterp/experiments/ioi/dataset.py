"""IOI prompts: the BABA/ABBA templates of Wang et al. 2022 ("Interpretability in the
Wild", appendix) x single-token names, each clean prompt with an "ABC" twin (a third name
C replaces the second occurrence of the subject), aligned token for token."""

from __future__ import annotations

import dataclasses

import numpy as np

# {A} {B}: the first clause's names (ABBA: A = IO, B = S; BABA: A = S, B = IO); {S}: the
# subject's repetition (S2). Places and objects are fixed per template.
TEMPLATES = (
    "Then, {A} and {B} went to the store. {S} gave a drink to",
    "Then, {A} and {B} had a lot of fun at the school. {S} gave a ring to",
    "Then, {A} and {B} were working at the office. {S} decided to give a bone to",
    "Then, {A} and {B} were thinking about going to the hospital. {S} wanted to give a "
    "basketball to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After {A} and {B} went to the garden, {S} gave a computer to",
    "When {A} and {B} got a necklace at the station, {S} decided to give it to",
    "While {A} and {B} were working at the restaurant, {S} gave a kiss to",
    "While {A} and {B} were commuting to the house, {S} gave a snack to",
    "Friends {A} and {B} found a ring at the market. {S} gave it to",
    "When {A} and {B} went to the store, {S} gave a drink to",
)
NAMES = ("Mary John Tom James Dan Sid Martin Amy Lisa Kate Anna Paul Mark Sarah Emma Jack "
         "Alice Bob David Michael Laura Rachel Jessica Daniel Chris Steve Peter Rose Mike Ben "
         "Sam Tim Alex Max Eric Kevin Jane Linda Susan Andrew Thomas Joe George Henry Lucy "
         "Emily Grace Ryan Adam Nick").split()
KEY_POSITIONS = ("IO", "S1", "S1+1", "S2", "END")


@dataclasses.dataclass
class TemplateBatch:
    """One template's prompts: ``clean``/``corrupted`` strings, ``tokens``/``corrupted_tokens``
    (batch, pos), answer ids ``io``/``s`` (batch,), ``positions`` (name -> (batch,) index of
    IO, S1, S1+1, S2, END) and ``str_tokens`` of the first prompt."""

    template: str
    clean: list[str]
    corrupted: list[str]
    tokens: np.ndarray
    corrupted_tokens: np.ndarray
    io: np.ndarray
    s: np.ndarray
    positions: dict[str, np.ndarray]
    str_tokens: list[str]


def check_names(lm, names) -> list[int]:
    """The ids of ``" " + name``; a ValueError naming every name that is not one token."""
    bad = {n: lm.to_str_tokens(" " + n, prepend_bos=False) for n in names}
    bad = {n: t for n, t in bad.items() if len(t) != 1}
    if bad:
        raise ValueError(f"IOI names must be one token with a leading space; these are not: "
                         f"{bad}: drop them from the name list")
    return [lm.to_single_token(" " + n) for n in names]


def align(lm, clean, corrupted) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (batch, pos) of clean and corrupted prompts (no BOS: SmolLM2 adds none), which
    must align token for token (``lm.aligned_pair`` names a pair that does not, with its
    token counts) and, within a batch, have one length."""
    (tokens, *mask), (corrupted_tokens, *_) = lm.aligned_pair(clean, corrupted,
                                                              prepend_bos=False)
    if mask:
        lengths = sorted({len(lm.to_str_tokens(t, prepend_bos=False)) for t in clean})
        raise ValueError(f"one batch needs prompts of one token length, got {lengths}: "
                         "names must be single tokens")
    return np.asarray(tokens), np.asarray(corrupted_tokens)


def build(lm, template: str, names, n_pairs: int, seed: int = 0) -> TemplateBatch:
    """``2 * n_pairs`` prompts of ``template``: ``n_pairs`` random (IO, S, C) triples of
    distinct ``names``, each in ABBA and BABA order. Clean and corrupted prompts must align
    token for token (``lm.aligned_pair`` names a pair that does not), and every prompt of
    the template must have the same length (:func:`align`)."""
    ids = dict(zip(names, check_names(lm, names)))
    if len(names) < 3:
        raise ValueError(f"IOI needs at least 3 distinct names, got {list(names)}")
    rng = np.random.default_rng(seed)
    clean, corrupted, io, s = [], [], [], []
    for _ in range(n_pairs):
        a, b, c = (names[i] for i in rng.choice(len(names), 3, replace=False))
        for first, second in ((a, b), (b, a)):  # ABBA (IO first), BABA (S first)
            clean.append(template.format(A=first, B=second, S=b))
            corrupted.append(template.format(A=first, B=second, S=c))
            io.append(ids[a])
            s.append(ids[b])
    tokens, corrupted_tokens = align(lm, clean, corrupted)
    io, s = np.asarray(io), np.asarray(s)
    hits = lambda name_ids: [np.flatnonzero(row == i) for row, i in zip(tokens, name_ids)]  # noqa: E731
    io_at, s_at = hits(io), hits(s)
    if any(len(h) != 1 for h in io_at) or any(len(h) != 2 for h in s_at):
        raise ValueError(f"template {template!r} must name IO once and S twice as tokens")
    positions = {"IO": np.array([h[0] for h in io_at]), "S1": np.array([h[0] for h in s_at]),
                 "S2": np.array([h[1] for h in s_at])}
    positions["S1+1"] = positions["S1"] + 1
    positions["END"] = np.full(len(tokens), tokens.shape[1] - 1)
    return TemplateBatch(template, clean, corrupted, tokens, corrupted_tokens, io,
                         s, {k: positions[k] for k in KEY_POSITIONS},
                         lm.to_str_tokens(clean[0], prepend_bos=False))
