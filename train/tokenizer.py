"""Tokenizers: a word-level one for synthetic tasks, and Hugging Face ones from a folder.

:class:`WordTokenizer`: text is split on whitespace; every word must be in the vocabulary
(an unknown word is an error naming it, never a silent ``<unk>``). Ids 0, 1, 2 are
``<pad>``, ``<bos>``, ``<eos>``.

:class:`HFTokenizer`: a ``tokenizers`` tokenizer loaded from a local folder's
``tokenizer.json``, behind the same interface. :func:`load_tokenizer` picks one by path.
"""

from __future__ import annotations

import collections
import difflib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

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
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls(json.loads(Path(path).read_text())["vocab"])

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and other.vocab == self.vocab

    def __hash__(self) -> int:
        return hash(self.vocab)


TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _special_token(folder: Path, key: str) -> str | None:
    """``key`` (e.g. ``'pad_token'``) from the folder's tokenizer config files, as
    transformers writes them (a string, or an AddedToken dict with ``content``)."""
    for name in SPECIAL_TOKEN_FILES:
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer from a local folder, with the interface of
    :class:`WordTokenizer` (``encode``, ``decode``, ``id``, ``vocab``, ``vocab_size``,
    ``pad_id``/``bos_id``/``eos_id``, ``save``/``load``).

    The folder needs ``tokenizer.json`` (what ``tokenizers.Tokenizer.save`` and
    ``transformers``' ``save_pretrained`` write); the pad/bos/eos tokens come from
    ``tokenizer_config.json`` or ``special_tokens_map.json`` when present (an id is None
    when the folder names no such token). Encodings are those of
    ``transformers.PreTrainedTokenizerFast`` on the same folder.
    """

    def __init__(self, tokenizer: Tokenizer, pad_token: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.special_tokens = {"pad_token": pad_token, "bos_token": bos_token,
                               "eos_token": eos_token}
        self.pad_id, self.bos_id, self.eos_id = (
            None if token is None else self.id(token) for token in self.special_tokens.values())

    @classmethod
    def load(cls, folder: str | Path) -> HFTokenizer:
        """Load ``folder/tokenizer.json`` (and the special tokens named next to it)."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in {folder} "
                f"({'it holds ' + str(found) if found is not None else 'no such folder'}); "
                "a Hugging Face tokenizer folder needs one: save it with "
                "tokenizers.Tokenizer.save(folder/'tokenizer.json') or a transformers "
                "fast tokenizer's save_pretrained(folder)")
        specials = {key: _special_token(folder, key) for key in ("pad_token", "bos_token",
                                                                 "eos_token")}
        return cls(Tokenizer.from_file(str(path)), **specials)

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and the special tokens (``tokenizer_config.json``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / TOKENIZER_FILE))
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        (folder / SPECIAL_TOKEN_FILES[0]).write_text(json.dumps(specials, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> tuple[str | None, ...]:
        """Token of every id (None for an id the tokenizer leaves unused)."""
        return tuple(self.tokenizer.id_to_token(i) for i in range(self.vocab_size))

    def id(self, token: str) -> int:
        """The id of one token."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            close = difflib.get_close_matches(token, list(vocab), n=3)
            hint = f"; close: {close}" if close else ""
            raise KeyError(f"token {token!r} is not in the vocabulary{hint}")
        return i

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = False
               ) -> np.ndarray:
        """Ids (int32) of a string, or of a list of pre-split words.

        Like :meth:`WordTokenizer.encode`, nothing is added by default;
        ``add_special_tokens=True`` applies the tokenizer's post-processor (e.g. a
        ``<bos>``), as ``transformers`` does by default.
        """
        pretokenized = not isinstance(text, str)
        encoding = self.tokenizer.encode(list(text) if pretokenized else text,
                                         is_pretokenized=pretokenized,
                                         add_special_tokens=add_special_tokens)
        return np.asarray(encoding.ids, np.int32)

    def decode(self, ids: Iterable[int], skip_pad: bool = True) -> str:
        """Text of ``ids`` (padding dropped unless ``skip_pad=False``; other special
        tokens kept)."""
        ids = np.asarray(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if skip_pad and self.pad_id is not None:
            ids = [i for i in ids if i != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __eq__(self, other) -> bool:
        return (isinstance(other, HFTokenizer) and other.special_tokens == self.special_tokens
                and other.tokenizer.to_str() == self.tokenizer.to_str())

    def __hash__(self) -> int:
        return hash(self.tokenizer.to_str())


def load_tokenizer(path: str | Path) -> WordTokenizer | HFTokenizer:
    """A folder with ``tokenizer.json`` -> :class:`HFTokenizer`; a vocabulary file
    written by :meth:`WordTokenizer.save` -> :class:`WordTokenizer`."""
    path = Path(path)
    return HFTokenizer.load(path) if path.is_dir() else WordTokenizer.load(path)
