"""Strings in, strings out: ``lm = mechinterp.load(path)`` bundles a model, its parameters
and its tokenizer, with TransformerLens's string helpers::

    lm = mechinterp.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # or a Hugging Face folder
    logits, cache = lm.run_with_cache("The capital of France is", sites=["resid_pre"])
    lm.generate("The capital of France is", max_new_tokens=1)   # '... is Paris'
    grid = lm.patch(mi.patching.get_act_patch_resid_pre, clean, corrupted,
                    lm.logit_diff(" Mary", " John"))

A thin layer: every method turns strings into tokens (and a mask where a batch is padded)
and calls the functional API, which stays the truth. It sits above
:mod:`mechinterp.models` like the CLI: the core never imports it (docs/decisions.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mechinterp import ablation, attribution, metrics, validate
from mechinterp.site_io import capture, intervene

__all__ = ["LanguageModel", "load"]


def _is_text(text) -> bool:
    return isinstance(text, str) or (isinstance(text, (list, tuple)) and len(text) > 0
                                     and isinstance(text[0], str))


@dataclasses.dataclass(eq=False)
class LanguageModel:
    """A model, its parameters and its ``tokenizers.Tokenizer``, with string helpers.

    ``tokenizer`` must add no special tokens itself (``encode(text, add_special_tokens=False)``
    is used); ``add_bos`` says whether prompts start with ``bos_token_id`` by default
    (TransformerLens's ``default_prepend_bos``). ``pad_token_id`` fills padded batches
    (default: the end-of-sequence token, else BOS, else 0; padded slots are masked anyway).
    """

    model: Any
    params: Any = dataclasses.field(repr=False)
    tokenizer: Any = dataclasses.field(default=None, repr=False)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos: bool = False
    padding_side: str = "right"

    # ------------------------------------------------------------------ tokens

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this LanguageModel has no tokenizer (the folder had no "
                             "tokenizer.json): pass token arrays, not strings")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        encoding = self._tok().encode(text, add_special_tokens=False)
        unk = self._unk_id()
        bad = [(start, end) for token, (start, end) in zip(encoding.ids, encoding.offsets)
               if unk is not None and token == unk]
        covered = np.zeros(len(text), bool)
        for start, end in encoding.offsets:
            covered[start:end] = True
        bad += [(i, i + 1) for i, c in enumerate(text) if not covered[i] and not c.isspace()]
        if bad:
            pieces = sorted({text[start:end] for start, end in bad})
            raise ValueError(
                f"the tokenizer cannot encode {pieces} in {text!r} (it gives the unknown "
                "token or drops them): use characters in its vocabulary")
        return list(encoding.ids)

    def _unk_id(self) -> int | None:
        model = self._tok().model
        token = getattr(model, "unk_token", None)
        if token is not None:
            return self._tok().token_to_id(token)
        unk_id = getattr(model, "unk_id", None)  # Unigram
        return unk_id if isinstance(unk_id, int) else None

    def _bos(self, prepend_bos: bool | None) -> list[int]:
        prepend = self.add_bos if prepend_bos is None else prepend_bos
        if not prepend:
            return []
        if self.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        return [int(self.bos_token_id)]

    def _pad_id(self) -> int:
        for token in (self.pad_token_id, self.eos_token_id, self.bos_token_id):
            if token is not None:
                return int(token)
        return 0

    def tokenize(self, text, prepend_bos: bool | None = None,
                 padding_side: str | None = None) -> tuple[jax.Array, jax.Array]:
        """``(tokens, attention_mask)``, both (batch, pos): a string is a batch of one; a
        list of strings is padded to its longest (``padding_side`` ``"right"``, as
        TransformerLens, or ``"left"``; the BOS token follows left padding)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = [self._bos(prepend_bos) + self._encode(t) for t in texts]
        if not all(rows):
            raise ValueError("an empty text without a BOS token gives no tokens")
        width = max(map(len, rows))
        tokens = np.full((len(rows), width), self._pad_id(), np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, row in enumerate(rows):
            where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            tokens[i, where], mask[i, where] = row, True
        return jnp.asarray(tokens), jnp.asarray(mask)

    def to_tokens(self, text, prepend_bos: bool | None = None,
                  padding_side: str | None = None, return_attention_mask: bool = False):
        """Tokens (batch, pos) of a string or list of strings (TransformerLens's
        ``to_tokens``); with ``return_attention_mask`` also the mask (see :meth:`tokenize`)."""
        tokens, mask = self.tokenize(text, prepend_bos, padding_side)
        return (tokens, mask) if return_attention_mask else tokens

    def to_single_token(self, text: str) -> int:
        """The id of ``text``, which must be exactly one token (e.g. ``" Paris"``)."""
        ids = self._encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens "
                             f"{[self.to_string([i]) for i in ids]}, not one")
        return ids[0]

    def to_str_tokens(self, text, prepend_bos: bool | None = None) -> list:
        """Each token as a string: a list for a string or 1-d tokens, a list of lists for a
        list of strings or 2-d tokens (padding dropped for strings)."""
        if isinstance(text, str):
            return [self._decode([i]) for i in self._bos(prepend_bos) + self._encode(text)]
        if isinstance(text, (list, tuple)) and text and isinstance(text[0], str):
            return [self.to_str_tokens(t, prepend_bos) for t in text]
        ids = np.asarray(text)
        if ids.ndim == 2:
            return [self.to_str_tokens(row) for row in ids]
        return [self._decode([int(i)]) for i in ids.reshape(-1)]

    def _decode(self, ids) -> str:
        return self._tok().decode([int(i) for i in ids], skip_special_tokens=False)

    def to_string(self, tokens):
        """The text of tokens: a string for 1-d tokens, a list of strings for 2-d."""
        ids = np.asarray(tokens)
        if ids.ndim == 2:
            return [self._decode(row) for row in ids]
        return self._decode(ids.reshape(-1))

    def _inputs(self, text, prepend_bos=None, padding_side=None) -> tuple:
        """Model inputs for text or tokens: ``(tokens,)``, plus the mask where padded."""
        if _is_text(text):
            tokens, mask = self.tokenize(text, prepend_bos, padding_side)
            return (tokens,) if bool(mask.all()) else (tokens, mask)
        tokens = jnp.asarray(text, jnp.int32)
        return (tokens[None] if tokens.ndim == 1 else tokens,)

    # ------------------------------------------------------------------ running

    def __call__(self, text, interventions: Mapping | None = None,
                 prepend_bos: bool | None = None, padding_side: str | None = None):
        """Logits (batch, pos, vocab) of text or tokens, under ``interventions``."""
        inputs = self._inputs(text, prepend_bos, padding_side)
        return intervene(self.model, self.params, *inputs, interventions=interventions or {})

    logits = __call__

    def run_with_cache(self, text, sites=None, interventions: Mapping | None = None,
                       prepend_bos: bool | None = None, padding_side: str | None = None):
        """``(logits, {site: activation})``: :func:`mechinterp.capture` on text or tokens."""
        inputs = self._inputs(text, prepend_bos, padding_side)
        return capture(self.model, self.params, *inputs, sites=sites,
                       interventions=interventions)

    def generate(self, text, max_new_tokens: int = 16, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 interventions: Mapping | None = None, prepend_bos: bool | None = None,
                 return_type: str | None = None):
        """Continue text (or tokens) with :func:`mechinterp.models.generate`.

        A list of prompts is padded on the left. Strings in give the prompt plus its
        continuation as strings out (BOS and padding dropped), tokens in give tokens out;
        ``return_type="tokens"`` / ``"str"`` chooses. ``interventions`` are shaped for the
        prompt tokens (``lm.to_tokens(text, padding_side="left")``): a field of size 1
        along positions applies at every position, generated ones included; one sized to
        the prompt applies at those prompt positions only (docs/decisions.md).
        """
        from mechinterp.models import generate

        strings = _is_text(text)
        inputs = self._inputs(text, prepend_bos, padding_side="left")
        rng = jax.random.key(seed) if temperature > 0 else None
        out = generate(self.model, self.params, *inputs, max_new_tokens=max_new_tokens,
                       temperature=temperature, rng=rng, top_k=top_k, top_p=top_p,
                       interventions=interventions)
        if (return_type or ("str" if strings else "tokens")) == "tokens":
            return out
        mask = np.asarray(inputs[1]) if len(inputs) > 1 else np.ones(inputs[0].shape, bool)
        skip = len(self._bos(prepend_bos)) if strings else 0
        texts = []
        for row, real in zip(np.asarray(out), mask):
            real = np.concatenate([real, np.ones(max_new_tokens, bool)])
            real[np.flatnonzero(real)[:skip]] = False
            texts.append(self._decode(row[real]))
        return texts[0] if isinstance(text, str) else texts

    # ------------------------------------------------------------------ analyses

    def logit_diff(self, correct: str, incorrect: str, pos=-1) -> metrics.LogitDiff:
        """:func:`mechinterp.metrics.logit_diff` of two one-token strings."""
        return metrics.logit_diff(jnp.asarray([self.to_single_token(correct)]),
                                  jnp.asarray([self.to_single_token(incorrect)]), pos)

    def aligned_pair(self, clean, corrupted, prepend_bos: bool | None = None,
                     padding_side: str | None = None) -> tuple[tuple, tuple]:
        """Model inputs of clean and corrupted prompts that must align token for token
        (patching): a clear error naming each pair whose token counts differ."""
        clean_texts = [clean] if isinstance(clean, str) else list(clean)
        corrupted_texts = [corrupted] if isinstance(corrupted, str) else list(corrupted)
        if len(clean_texts) != len(corrupted_texts):
            raise ValueError(f"{len(clean_texts)} clean prompts but {len(corrupted_texts)} "
                             "corrupted ones: patching pairs them one to one")
        problems = []
        for i, (a, b) in enumerate(zip(clean_texts, corrupted_texts)):
            if not isinstance(a, str) or not isinstance(b, str):
                continue
            na, nb = len(self._encode(a)), len(self._encode(b))
            if na != nb:
                problems.append(
                    f"pair {i}: clean {a!r} has {na} tokens {self.to_str_tokens(a, False)}, "
                    f"corrupted {b!r} has {nb} {self.to_str_tokens(b, False)} (differ by "
                    f"{abs(na - nb)} token{'s' if abs(na - nb) != 1 else ''})")
        if problems:
            raise ValueError("clean and corrupted prompts must have the same number of "
                             "tokens to patch position by position:\n  " + "\n  ".join(problems))
        make = lambda t: self._inputs(t, prepend_bos, padding_side)  # noqa: E731
        clean_inputs, corrupted_inputs = make(clean), make(corrupted)
        if clean_inputs[0].shape != corrupted_inputs[0].shape:
            raise ValueError(f"clean tokens {clean_inputs[0].shape} and corrupted tokens "
                             f"{corrupted_inputs[0].shape} differ in shape")
        return clean_inputs, corrupted_inputs

    def patch(self, patching_fn, clean, corrupted, metric, prepend_bos: bool | None = None,
              padding_side: str | None = None, **kwargs):
        """``patching_fn(model, params, corrupted_tokens, clean_cache, metric, **kwargs)``
        (any :mod:`mechinterp.patching` grid) on strings or tokens: the clean cache is
        captured on ``clean`` for the sites the grid patches."""
        (clean_tokens, *mask), (corrupted_tokens, *_) = self.aligned_pair(
            clean, corrupted, prepend_bos, padding_side)
        if mask:
            kwargs["model_kwargs"] = {"attention_mask": mask[0],
                                      **(kwargs.get("model_kwargs") or {})}
        _, cache = capture(self.model, self.params, clean_tokens,
                           sites=getattr(patching_fn, "sites", None),
                           **(kwargs.get("model_kwargs") or {}))
        return patching_fn(self.model, self.params, corrupted_tokens, cache, metric, **kwargs)

    def attribution_patch(self, clean, corrupted, metric, grids: Mapping[str, Sequence[str]],
                          prepend_bos: bool | None = None, padding_side: str | None = None):
        """:func:`mechinterp.attribution.attribution_patch` on strings or tokens."""
        (clean_tokens, *mask), (corrupted_tokens, *_) = self.aligned_pair(
            clean, corrupted, prepend_bos, padding_side)
        model_kwargs = {"attention_mask": mask[0]} if mask else {}
        _, cache = capture(self.model, self.params, clean_tokens, sites=list(grids),
                           **model_kwargs)
        return attribution.attribution_patch(self.model, self.params, corrupted_tokens, cache,
                                             metric, grids, model_kwargs=model_kwargs)

    def logit_lens(self, text, k: int = 5, prepend_bos: bool | None = None) -> dict:
        """The logit lens on one text (:func:`mechinterp.depth_efficiency.logit_lens_top_k`):
        ``layers`` (``"0_pre"`` ... ``"final_post"``), ``str_tokens`` (the input),
        ``top_tokens[layer][pos]`` (the ``k`` likeliest next tokens, strings, best first)
        and ``top_probs`` (layer, pos, k)."""
        from mechinterp.depth_efficiency import lens_labels, logit_lens_top_k

        if not isinstance(text, str):
            raise TypeError("logit_lens takes one text (a string); loop over a list")
        tokens, = self._inputs(text, prepend_bos)
        ids, probs = logit_lens_top_k(self.model, self.params, tokens, k=k)
        return dict(layers=lens_labels(ids.shape[0] - 1),
                    str_tokens=self.to_str_tokens(text, prepend_bos),
                    top_tokens=[[[self._decode([t]) for t in pos] for pos in layer[0]]
                                for layer in ids],
                    top_probs=probs[:, 0])

    def logit_attribution(self, text, correct: str, incorrect: str | None = None,
                          prepend_bos: bool | None = None):
        """:func:`mechinterp.logit_attribution.logit_attribution` of the logit of the
        one-token string ``correct`` (minus ``incorrect``) after text (a list of texts is
        padded on the left, so the last position is each one's last token)."""
        from mechinterp.logit_attribution import logit_attribution

        tokens, *mask = self._inputs(text, prepend_bos, padding_side="left")
        wrong = None if incorrect is None else self.to_single_token(incorrect)
        return logit_attribution(self.model, self.params, tokens,
                                 *mask, tokens=self.to_single_token(correct),
                                 incorrect_tokens=wrong)

    def attention_view(self, text: str, layer: int, heads=None,
                       prepend_bos: bool | None = None):
        """The attention pattern of ``layer`` on one text, as an HTML view labelled by its
        tokens (:func:`mechinterp.display.attention_html`; displays in notebooks, ``.save``
        writes a page). ``heads``: an index or a list of them (default: every head)."""
        from mechinterp.display import HtmlView, attention_html

        if not isinstance(text, str):
            raise TypeError("attention_view takes one text (a string); loop over a list")
        tokens, = self._inputs(text, prepend_bos)
        _, cache = capture(self.model, self.params, tokens, sites=["attn.pattern"])
        pattern = np.asarray(cache["attn.pattern"])  # (layer, batch, head, query, key)
        n_layers, n_heads = pattern.shape[0], pattern.shape[2]
        layer = validate.check_index(layer, "layer")
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers")
        heads = list(range(n_heads)) if heads is None else (
            [heads] if np.ndim(heads) == 0 else list(heads))
        for head in heads:
            if not -n_heads <= validate.check_index(head, "head") < n_heads:
                raise ValueError(f"head {head} is out of range: layer {layer} has {n_heads} "
                                 "heads")
        layer = layer % n_layers
        heads = [h % n_heads for h in heads]
        return HtmlView(attention_html(pattern[layer, 0, heads],
                                       self.to_str_tokens(text, prepend_bos),
                                       head_names=[f"L{layer}H{h}" for h in heads],
                                       title=f"attention, layer {layer}"))

    def ablate(self, text, components, method: str = "zero", values: Mapping | None = None,
               prepend_bos: bool | None = None, padding_side: str | None = None):
        """Logits with ``components`` ablated: :func:`mechinterp.ablation.ablate`."""
        inputs = self._inputs(text, prepend_bos, padding_side)
        return ablation.ablate(self.model, self.params, *inputs, components=components,
                               method=method, values=values)


# ---------------------------------------------------------------------- loading


def _special(folder: Path, tokenizer, name: str) -> int | None:
    """A special token id from tokenizer_config.json (``bos_token`` ...) or config.json
    (``bos_token_id`` ...)."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        token = json.loads(config.read_text()).get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    model_config = folder / "config.json"
    if model_config.is_file():
        value = json.loads(model_config.read_text()).get(f"{name}_id")
        if isinstance(value, list):
            value = value[0] if value else None
        return value
    return None


def _hf_tokenizer(folder: Path) -> dict:
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        return {}
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = _special(folder, tokenizer, "bos_token")
    add_bos = None
    config = folder / "tokenizer_config.json"
    if config.is_file():
        add_bos = json.loads(config.read_text()).get("add_bos_token")
    if add_bos is None:  # does the tokenizer's own post-processor put BOS first?
        ids = tokenizer.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and bool(ids) and ids[0] == bos
    return dict(tokenizer=tokenizer, bos_token_id=bos,
                eos_token_id=_special(folder, tokenizer, "eos_token"),
                pad_token_id=_special(folder, tokenizer, "pad_token"), add_bos=bool(add_bos))


def load(path, dtype=jnp.float32, scan_layers: bool = True) -> LanguageModel:
    """A :class:`LanguageModel` from a ``.gguf`` file (model and the tokenizer in its
    metadata) or a Hugging Face folder (safetensors; ``tokenizer.json`` if present)."""
    from mechinterp import models

    path = Path(path)
    if path.is_file() and path.suffix != ".gguf":
        with open(path, "rb") as file:
            is_gguf = file.read(4) == b"GGUF"
    else:
        is_gguf = path.suffix == ".gguf"
    if is_gguf:
        model, params = models.load_gguf(path, dtype=dtype, scan_layers=scan_layers)
        tok = models.load_gguf_tokenizer(path)
        return LanguageModel(model, params, tok.tokenizer, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, add_bos=tok.add_bos_token)
    if not path.is_dir():
        raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    model, params = models.load_hf(path, dtype=dtype, scan_layers=scan_layers)
    tokenizer = _hf_tokenizer(path)
    if tokenizer:  # the tokenizer adds BOS (and other specials) through us, not itself
        tokenizer["tokenizer"].post_processor = None
    return LanguageModel(model, params, **tokenizer)
