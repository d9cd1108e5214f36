"""One import root: models/ and train/ install as mechinterp.models and mechinterp.train.

Editable install (the README's set-up), a regular install, and pytest from the repo root must
all import the same package, and no generic top-level ``models`` or ``train`` package may
land in site-packages.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def test_pytest_from_root_imports_the_repo_sources():
    import mechinterp.models
    import mechinterp.train

    assert Path(mechinterp.__file__).resolve().parent == REPO / "mechinterp"
    assert Path(mechinterp.models.__file__).resolve().parent == REPO / "models"
    assert Path(mechinterp.train.__file__).resolve().parent == REPO / "train"
    assert mechinterp.models is mechinterp.__getattr__("models")


def test_installed_editable_pointing_at_this_checkout():
    dist = importlib.metadata.distribution("mechinterp")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert direct_url.get("dir_info", {}).get("editable") is True, direct_url
    assert Path(direct_url["url"].removeprefix("file://")).resolve() == REPO


@pytest.mark.slow
def test_regular_install_has_one_import_root(tmp_path):
    target = tmp_path / "site"
    # Build from a copy: building in the checkout leaves mechinterp.egg-info and build/ there,
    # and that egg-info then shadows the editable install's record in the next session.
    source_copy = tmp_path / "source"
    shutil.copytree(REPO, source_copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source_copy)],
        check=True,
        cwd=tmp_path,
    )
    top_level = {p.name for p in target.iterdir()}
    assert "mechinterp" in top_level
    assert not {"models", "train"} & top_level, top_level
    probe = (
        "import json, mechinterp, mechinterp.models, mechinterp.train;"
        "print(json.dumps([mechinterp.__file__, mechinterp.models.__file__,"
        " mechinterp.train.__file__]))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True,
        cwd=tmp_path, env=env,
    ).stdout
    files = [Path(f) for f in json.loads(out)]
    assert all(target in f.parents for f in files), files
    # every source of this checkout, subpackages included, byte for byte
    for folder, installed in [("mechinterp", "mechinterp"), ("models", "mechinterp/models"),
                              ("train", "mechinterp/train")]:
        for source in (REPO / folder).rglob("*.py"):
            relative = source.relative_to(REPO / folder)
            if folder == "mechinterp" and relative.parts[0] in ("models", "train"):
                continue
            copy = target / installed / relative
            assert copy.is_file(), f"{relative} of {folder}/ is not installed"
            assert copy.read_text() == source.read_text()
