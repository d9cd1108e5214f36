"""Natural-language twins for a real model (``preset=paper``), built from small tables.

- *recall*: a fact the model should know, not in the prompt: "The capital city of France
  is" -> " Paris", "The official language of Japan is" -> " Japanese"; the twin swaps the
  country for another of the same relation whose answer differs ("... of Italy is").
- *reasoning*: two-hop binding in context, after ``shots`` solved examples: "Anna is in
  Rome and Tom is in Oslo. Mark is with Tom. Mark is in" -> " Oslo" (person -> companion
  -> companion's city); the twin changes the companion to the other person, so the answer
  becomes the other city, which is in the prompt too.

Answers are the first token of the answer word. :func:`twins_of` tokenizes a task's items
(one token length per task, exactly one differing token per pair, else an error naming the
item); :func:`solved` is the model's own top-1 check on both prompts of each pair.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mechinterp.experiments.kit.lm import logits_of
from mechinterp.experiments.recall_reasoning.puzzles import Twins

COUNTRIES = {  # country: (capital, official language); single-token country names
    "France": ("Paris", "French"), "Italy": ("Rome", "Italian"), "Spain": ("Madrid", "Spanish"),
    "Germany": ("Berlin", "German"), "Japan": ("Tokyo", "Japanese"),
    "China": ("Beijing", "Chinese"), "India": ("Delhi", "Hindi"), "Russia": ("Moscow", "Russian"),
    "Egypt": ("Cairo", "Arabic"), "Greece": ("Athens", "Greek"), "Poland": ("Warsaw", "Polish"),
    "Sweden": ("Stockholm", "Swedish"), "Norway": ("Oslo", "Norwegian"),
    "Brazil": ("Brasilia", "Portuguese"), "Canada": ("Ottawa", "English"),
    "Peru": ("Lima", "Spanish"), "Kenya": ("Nairobi", "Swahili"), "Turkey": ("Ankara", "Turkish"),
    "Iran": ("Tehran", "Persian"), "Cuba": ("Havana", "Spanish"), "Ireland": ("Dublin", "Irish"),
    "Portugal": ("Lisbon", "Portuguese"), "Austria": ("Vienna", "German"),
    "Hungary": ("Budapest", "Hungarian"), "Finland": ("Helsinki", "Finnish"),
    "Denmark": ("Copenhagen", "Danish"), "Thailand": ("Bangkok", "Thai"),
    "Vietnam": ("Hanoi", "Vietnamese"), "Australia": ("Canberra", "English"),
    "England": ("London", "English"), "Israel": ("Jerusalem", "Hebrew"),
    "Ukraine": ("Kyiv", "Ukrainian"), "Netherlands": ("Amsterdam", "Dutch"),
    "Switzerland": ("Bern", "German"), "Korea": ("Seoul", "Korean"), "Iraq": ("Baghdad", "Arabic"),
    "Syria": ("Damascus", "Arabic"), "Chile": ("Santiago", "Spanish"),
    "Indonesia": ("Jakarta", "Indonesian"), "Philippines": ("Manila", "Filipino"),
    "Scotland": ("Edinburgh", "English"), "Wales": ("Cardiff", "Welsh"),
}
RECALL_TEMPLATES = {"capital": ("The capital city of {} is", 0),  # relation: (prompt, column)
                    "language": ("The official language of {} is", 1)}
NAMES = ("Alice", "Bob", "David", "John", "Mary", "Tom", "Anna", "Peter", "Sarah", "James",
         "Mark", "Paul")  # one token with and without a leading space
CITIES = ("Paris", "Rome", "London", "Berlin", "Madrid", "Tokyo", "Moscow", "Vienna",
          "Dublin", "Cairo", "Athens", "Oslo")
PREMISE = "{} is in {}"
REASONING = "{first} and {second}. {b} is with {q}. {b} is in"


@dataclasses.dataclass(frozen=True)
class Item:
    """One twin pair as text; ``name`` identifies it in errors and reports."""

    name: str
    clean: str
    corrupt: str
    clean_answer: str
    corrupt_answer: str


def recall_items(lm, countries: dict = COUNTRIES, templates: dict = RECALL_TEMPLATES,
                 seed: int = 0) -> list[Item]:
    """Every (relation, country) fact with a twin: another country of the table, drawn with
    ``numpy.random.default_rng([seed, 31])``, whose answer starts with another token."""
    rng = np.random.default_rng([seed, 31])
    items = []
    for relation, (template, column) in templates.items():
        answers = {c: " " + row[column] for c, row in countries.items()}
        first = {c: _first_token(lm, a) for c, a in answers.items()}
        for country in countries:
            others = [c for c in countries if first[c] != first[country]]
            if not others:
                raise ValueError(f"recall {relation}/{country}: every country of the table has "
                                 "the same answer, so no twin changes it; add rows")
            twin = others[int(rng.integers(len(others)))]
            items.append(Item(f"{relation}/{country}~{twin}", template.format(country),
                              template.format(twin), answers[country], answers[twin]))
    return items


def reasoning_items(n: int, seed: int = 0, shots: int = 1, names=NAMES,
                    cities=CITIES) -> list[Item]:
    """``n`` two-hop binding items (:data:`REASONING`), each after ``shots`` solved
    examples (own names and cities), drawn with ``numpy.random.default_rng([seed, 37])``;
    the order of the two premises is random."""
    rng = np.random.default_rng([seed, 37])

    def one():
        a, b, c = (str(v) for v in rng.choice(names, 3, replace=False))
        x, y = (str(v) for v in rng.choice(cities, 2, replace=False))
        premises = [PREMISE.format(a, x), PREMISE.format(c, y)]
        first, second = premises[::-1] if rng.random() < 0.5 else premises
        text = REASONING.format(first=first, second=second, b=b, q="{q}")
        return text, a, c, " " + x, " " + y  # a -> x is asked; the twin asks c -> y

    items = []
    for i in range(n):
        context = ""
        for _ in range(shots):
            text, asked, _, answer, _ = one()
            context += text.format(q=asked) + answer + ".\n"
        text, asked, other, answer, other_answer = one()
        items.append(Item(f"reasoning/{i}", context + text.format(q=asked),
                          context + text.format(q=other), answer, other_answer))
    return items


def _first_token(lm, text: str) -> int:
    return int(lm.to_tokens(text, prepend_bos=False)[0, 0])


def twins_of(lm, task: str, items: list[Item]) -> Twins:
    """The token arrays of ``items``: every prompt of a task one token length, each pair
    differing in exactly one token, the two answers' first tokens different; each of these
    is an error naming the item."""
    if not items:
        raise ValueError(f"no {task} items to tokenize")
    pieces = {side: [lm.to_str_tokens(getattr(i, side), prepend_bos=False) for i in items]
              for side in ("clean", "corrupt")}
    unequal = [f"{i.name}: {len(c)} tokens {c} vs the twin's {len(t)} {t}"
               for i, c, t in zip(items, pieces["clean"], pieces["corrupt"]) if len(c) != len(t)]
    if unequal:
        raise ValueError(f"{task} twins must have the same number of tokens to patch position "
                         f"by position: {'; '.join(unequal)}")
    n = len(pieces["clean"][0])
    odd = [f"{i.name} ({len(c)}: {c})" for i, c in zip(items, pieces["clean"]) if len(c) != n]
    if odd:
        raise ValueError(f"{task} prompts must all have {n} tokens (as {items[0].name}); these "
                         f"differ: {'; '.join(odd)}. Use names that are one token (with and "
                         "without a leading space)")
    clean, corrupt = (lm.to_tokens([getattr(i, side) for i in items], prepend_bos=False)
                      for side in ("clean", "corrupt"))
    clean, corrupt = np.asarray(clean, np.int32), np.asarray(corrupt, np.int32)
    answers = np.asarray([[_first_token(lm, i.clean_answer), _first_token(lm, i.corrupt_answer)]
                          for i in items], np.int32)
    differs = (clean != corrupt).sum(1)
    bad = [f"{i.name} ({int(d)} tokens differ)" for i, d in zip(items, differs) if d != 1]
    bad += [f"{i.name} (both answers start with {lm.to_string([int(a[0])])!r})"
            for i, a in zip(items, answers) if a[0] == a[1]]
    if bad:
        raise ValueError(f"{task} twins must differ in one prompt token and in the answer's "
                         f"first token: {'; '.join(bad)}")
    return Twins(task=task, clean=clean, corrupt=corrupt, clean_answer=answers[:, 0],
                 corrupt_answer=answers[:, 1], changed=(clean != corrupt).argmax(1)
                 .astype(np.int32), words=pieces["clean"][0])


def _last(model, params, tokens, ids, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The top-1 token at the last position and the logits of ``ids`` (n, k) there, per
    row (``chunk`` rows per forward: full-vocabulary logits are large)."""
    top, picked = [], []
    for i in range(0, len(tokens), chunk):
        last = np.asarray(logits_of(model, params, tokens[i:i + chunk])[:, -1])
        top.append(last.argmax(-1))
        picked.append(np.take_along_axis(last, ids[i:i + chunk], axis=1))
    return np.concatenate(top), np.concatenate(picked)


def solved(model, params, twins: Twins) -> dict:
    """Per item: top-1 right on the clean prompt, on its twin, and on both; the logit
    difference answer - twin's answer on each prompt (``ld_clean`` > 0 and ``ld_twin`` < 0
    is right in a forced choice between the two answers)."""
    ids = np.stack([twins.clean_answer, twins.corrupt_answer], 1)
    out = {}
    for side, answer in (("clean", twins.clean_answer), ("corrupt", twins.corrupt_answer)):
        top, picked = _last(model, params, getattr(twins, side), ids)
        out[side] = top == answer
        out["ld_" + ("clean" if side == "clean" else "twin")] = picked[:, 0] - picked[:, 1]
    out["both"] = out["clean"] & out["corrupt"]
    return out


def subset(twins: Twins, keep: np.ndarray) -> Twins:
    """The twins of the items where ``keep`` is true."""
    return dataclasses.replace(twins, clean=twins.clean[keep], corrupt=twins.corrupt[keep],
                               clean_answer=twins.clean_answer[keep],
                               corrupt_answer=twins.corrupt_answer[keep],
                               changed=twins.changed[keep])
