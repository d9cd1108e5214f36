"""The site table in docs/sites.md lists exactly what each family declares."""

import re
from pathlib import Path

from mechinterp.models import Decoder

DOC = Path(__file__).resolve().parents[1] / "docs" / "sites.md"


def _documented_rows(section_title: str) -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    section = text.split(section_title, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    return {name: (axes.strip(), meaning.strip()) for name, axes, meaning in rows}


def test_decoder_site_table_matches_declarations():
    documented = _documented_rows("## Decoder")
    declared = {name: (", ".join(spec.axes), spec.meaning) for name, spec in Decoder.SITES.items()}
    assert documented == declared


def test_cnn_site_table_matches_declarations():
    from mechinterp.models.cnn import CNN

    documented = _documented_rows("## CNN")
    declared = {name: (", ".join(spec.axes), spec.meaning) for name, spec in CNN.SITES.items()}
    assert documented == declared


def test_vit_site_table_matches_declarations():
    from mechinterp.models.vit import ViT

    documented = _documented_rows("## ViT")
    declared = {name: (", ".join(spec.axes), spec.meaning) for name, spec in ViT.SITES.items()}
    assert documented == declared
