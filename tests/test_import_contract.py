"""The dependency direction (core <- models <- train <- experiments, cli) holds: the
import-linter contracts in pyproject.toml are all kept.

grimp, import-linter's graph builder, reads one directory per root package, but
``mechinterp.models`` and ``mechinterp.train`` live in the top-level ``models/`` and
``train/`` folders (``[tool.setuptools.package-dir]``). So the check runs on the installed
layout: the sources copied as one ``mechinterp`` tree into a temporary folder, put first on
the path. Run by hand: ``python tests/test_import_contract.py``.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def installed_layout(target: Path) -> Path:
    """The packages of pyproject.toml, laid out as installed, under ``target``."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        parent = max((p for p in package_dir if package == p or package.startswith(p + ".")),
                     key=len)
        source = ROOT / package_dir[parent] / Path(*package.split(".")[len(parent.split(".")):])
        destination = target / Path(*package.split("."))
        destination.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, destination / file.name)
    return target


def lint_imports(layout: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml"),
                           "--no-cache"], cwd=layout, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_import_contract_is_kept(tmp_path):
    pytest.importorskip("importlinter")
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout, result.stdout


def test_a_core_module_importing_a_family_breaks_the_contract(tmp_path):
    pytest.importorskip("importlinter")
    layout = installed_layout(tmp_path)
    sweep = layout / "mechinterp" / "sweep.py"
    sweep.write_text(sweep.read_text() + "\n\ndef _bad():\n    from mechinterp.models import Decoder\n")
    result = lint_imports(layout)
    assert result.returncode != 0
    assert "mechinterp.sweep -> mechinterp.models" in result.stdout, result.stdout


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        done = lint_imports(installed_layout(Path(folder)))
        print(done.stdout, done.stderr, sep="")
        sys.exit(done.returncode)


def test_every_core_module_is_under_the_core_contract():
    """A new module in mechinterp/ is core unless it is the CLI or the string layer
    (language_model: mechinterp.load, above the families; experiments/ is a package on
    top): it must be listed, or the contract would silently not cover it."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    core = next(c for c in contracts if "mechinterp.models" in c.get("forbidden_modules", [])
                and "mechinterp.models" not in c["source_modules"])
    modules = {f"mechinterp.{p.stem}" for p in (ROOT / "mechinterp").glob("*.py")
               if p.stem not in ("__init__", "cli", "language_model")}
    assert modules == set(core["source_modules"]), modules ^ set(core["source_modules"])
