"""Modules a newcomer can read (issue 13): no source file over ~500 lines and module
docstrings of at most ~15 lines (long design notes live in docs/). Benchmarks are scripts
whose docstrings are their usage notes, so they are left out."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("mechinterp", "models", "train")
                 for p in (ROOT / folder).rglob("*.py"))
MAX_LINES = 500
MAX_DOCSTRING_LINES = 15


def test_sources_are_found():
    assert len(SOURCES) > 40


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_file_is_small_with_a_short_docstring(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_LINES, f"{path.name}: {text.count(chr(10))} lines; split it"
    docstring = ast.get_docstring(ast.parse(text), clean=False) or ""
    lines = docstring.strip("\n").count("\n") + 1 if docstring else 0
    assert lines <= MAX_DOCSTRING_LINES, (
        f"{path.name}: module docstring of {lines} lines; move design notes to docs/")
