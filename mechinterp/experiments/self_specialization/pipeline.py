"""Self-specialization's data loop on a :class:`~mechinterp.language_model.LanguageModel`.

:func:`self_generate`: few-shot prompts of random seed instructions -> the model writes new
instructions; each gets the corpus passage with the most word overlap (retrieval) in its
answer prompt -> the model answers in ChatML (SmolLM2-Instruct's chat format); every
sample is drawn by :func:`sample_texts`, i.e. ``models.generate``'s KV-cache prefill and
scanned decode. :func:`encode_pairs` turns kept pairs into training / evaluation rows
(loss on the answer and its end-of-turn token only).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mechinterp.experiments.kit import lm as kit_lm
from mechinterp.experiments.self_specialization import data, filtering

START, END = "<|im_start|>", "<|im_end|>"


def chat(user: str) -> str:
    """A ChatML user turn and the assistant's opening."""
    return f"{START}user\n{user}{END}\n{START}assistant\n"


def check_chat_tokens(lm) -> None:
    for token in (START, END):
        try:
            lm.to_single_token(token)
        except ValueError as error:
            raise ValueError(f"self-specialization prompts use ChatML ({token!r} must be one "
                             "token, as in SmolLM2-Instruct); this tokenizer splits it: "
                             "use checkpoint=smollm2") from error


def truncated(lm, n_layers: int | None):
    """``lm`` keeping its first ``n_layers`` layers (embedding, tokenizer and head kept);
    ``None`` keeps them all."""
    if n_layers is None or n_layers == lm.model.config.n_layers:
        return lm
    if not 1 <= n_layers <= lm.model.config.n_layers:
        raise ValueError(f"model.n_layers={n_layers} is out of range: the checkpoint has "
                         f"{lm.model.config.n_layers} layers (0 keeps them all)")
    config = dataclasses.replace(lm.model.config, n_layers=n_layers)
    params = {**lm.params, "layers": jax.tree.map(lambda x: x[:n_layers], lm.params["layers"])}
    return dataclasses.replace(lm, model=lm.model.clone(config=config), params=params)


def sample_texts(lm, prompts, max_new_tokens: int, temperature: float, top_k, seed: int):
    """The continuation of each prompt (new tokens only, as text), sampled in one batch by
    ``models.generate`` (left-padded prompts, KV cache)."""
    width = lm.to_tokens(list(prompts), padding_side="left").shape[1]
    out = lm.generate(list(prompts), max_new_tokens, temperature=temperature,
                      top_k=top_k if temperature > 0 else None, seed=seed, return_type="tokens")
    return [lm.to_string(row) for row in np.asarray(out)[:, width:]]


def first_line(text: str) -> str:
    return text.split(END)[0].strip().split("\n")[0].strip()


def first_sentence(text: str) -> str:
    return data.first_sentence(text.split(END)[0].split("\n\n")[0]) if text.strip() else ""


def self_generate(lm, g, passages, rng: np.random.Generator, seed: int, retrieval: bool):
    """Generated ``(instruction, answer)`` pairs, ``{instruction: retrieved passage name or
    "-"}`` and the instruction filter's drop counts. ``g``:
    ``n_candidates``, ``shots``, ``instruction_tokens``, ``answer_tokens``, ``temperature``,
    ``top_k``, ``max_rouge``."""
    seeds = [q for q, _ in data.SEEDS]
    prompts = []
    for _ in range(g.n_candidates):
        shots = rng.choice(len(seeds), g.shots, replace=False)
        prompts.append("Questions about the Python standard library:\n"
                       + "".join(f"Q: {seeds[i]}\n" for i in shots) + "Q:")
    instructions = [first_line(t) for t in sample_texts(
        lm, prompts, g.instruction_tokens, g.temperature, g.top_k, seed)]
    valid, dropped = filtering.filter_pairs([(i, None) for i in instructions], seeds,
                                            max_rouge=g.max_rouge)
    instructions = [i for i, _ in valid]
    if not instructions:
        return [], {}, {"instructions": dropped}
    found = [(data.retrieve(i, passages) or [None])[0] if retrieval else None
             for i in instructions]
    answer_prompts = [chat(f"Reference: {p.text}\n\n{i} Answer in one sentence." if p else
                           f"{i} Answer in one sentence.") for i, p in zip(instructions, found)]
    answers = [first_sentence(t) for t in sample_texts(
        lm, answer_prompts, g.answer_tokens, g.temperature, g.top_k, seed + 1)]
    pairs = list(zip(instructions, answers))
    return pairs, {i: p.name if p else "-" for i, p in zip(instructions, found)}, \
        {"instructions": dropped}


def encode_pairs(lm, pairs, width: int) -> kit_lm.Examples:
    """Rows ``chat(instruction) + answer + <|im_end|>``, right-padded to ``width`` tokens,
    targets on the answer part; pairs longer than ``width`` are cut at ``width``."""
    n = len(pairs)
    tokens = np.full((n, width), lm.to_single_token(END), np.int32)
    mask = np.zeros((n, width), np.float32)
    real = np.zeros((n, width), bool)
    for row, (instruction, answer) in enumerate(pairs):
        prompt = np.asarray(lm.to_tokens(chat(instruction), prepend_bos=False))[0]
        target = np.asarray(lm.to_tokens(answer + END, prepend_bos=False))[0]
        ids = np.concatenate([prompt, target])[:width]
        tokens[row, :len(ids)] = ids
        mask[row, len(prompt):len(ids)] = 1.0
        real[row, :len(ids)] = True
    return kit_lm.Examples(tokens, mask, np.zeros(n, np.int32), real, ("domain",))
