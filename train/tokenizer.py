"""A word-level tokenizer with a fixed vocabulary, for synthetic tasks.

Text is split on whitespace; every word must be in the vocabulary (an unknown word is an
error naming it, never a silent ``<unk>``). Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``.
"""

from __future__ import annotations

import collections
import difflib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)


class WordTokenizer:
    """Maps whitespace-separated words to ids and back."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, words: Iterable[str]):
        vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        bad = [w for w in vocab if not w or any(c.isspace() for c in w)]
        if bad:
            raise ValueError(f"vocabulary words must be non-empty without spaces: {bad[:5]}")
        dupes = sorted(w for w, n in collections.Counter(vocab).items() if n > 1)
        if dupes:
            raise ValueError(f"vocabulary has duplicate words {dupes[:5]}")
        self.vocab: tuple[str, ...] = tuple(vocab)
        self._ids = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def id(self, word: str) -> int:
        """The id of one word."""
        try:
            return self._ids[word]
        except KeyError:
            close = difflib.get_close_matches(word, self.vocab, n=3)
            hint = f"; close: {close}" if close else ""
            raise KeyError(f"word {word!r} is not in the vocabulary{hint}") from None

    def encode(self, text: str | Sequence[str]) -> np.ndarray:
        """Ids (int32) of a string (split on whitespace) or a list of words."""
        words = text.split() if isinstance(text, str) else text
        return np.asarray([self.id(w) for w in words], np.int32)

    def decode(self, ids: Iterable[int], skip_pad: bool = True) -> str:
        """Words joined by spaces (padding dropped unless ``skip_pad=False``)."""
        words = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"id {i} is outside the vocabulary (size {len(self.vocab)})")
            if not (skip_pad and i == self.pad_id):
                words.append(self.vocab[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vocab": list(self.vocab)}))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        return cls(json.loads(Path(path).read_text())["vocab"])

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and other.vocab == self.vocab

    def __hash__(self) -> int:
        return hash(self.vocab)
