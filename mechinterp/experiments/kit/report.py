"""report.md helpers: markdown tables and the "paper's claim | ours | reproduced?" table."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mechinterp.experiments.kit.seeds import aggregate, pm


@dataclasses.dataclass
class Claim:
    """One row of the claims table. ``reproduced``: True, False or None (not testable
    here); ``note`` says why, e.g. which threshold was used."""

    claim: str
    ours: str
    reproduced: bool | None
    note: str = ""


def lower_claim(claim: str, what: str, a_name: str, a, b_name: str, b,
                extra: str = "") -> Claim:
    """``a`` below ``b`` (per-seed values, e.g. errors): ``ours`` gives each as mean ± sd
    (then ``extra``), the verdict compares the means, the note counts the seeds with
    ``a < b``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return Claim(claim, f"{what}: {a_name} {pm(aggregate(list(a)), '.3f')}, {b_name} "
                 f"{pm(aggregate(list(b)), '.3f')}{extra}", bool(a.mean() < b.mean()),
                 f"{a_name} lower in {int(np.sum(a < b))} of {len(a)} seeds")


def verdict(reproduced: bool | None) -> str:
    return {True: "yes", False: "no", None: "not tested"}[reproduced]


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Markdown table lines (cells are ``str()``-ed; ``|`` in a cell is escaped)."""
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return lines


def claims_table(claims: Sequence[Claim]) -> list[str]:
    """``| paper's claim | ours | reproduced? |`` lines; notes follow the verdict."""
    return table(["paper's claim", "ours", "reproduced?"],
                 [(c.claim, c.ours, verdict(c.reproduced) + (f" ({c.note})" if c.note else ""))
                  for c in claims])


def timings_line(timings: dict) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
