"""The core's import contracts (``[tool.importlinter]`` in pyproject.toml) hold: each subpackage
imports only the layers below it, and no modules import each other in a cycle. ``make test`` runs
``lint-imports`` too; this test makes ``pytest`` alone catch a violation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_core_keeps_its_layers_and_has_no_import_cycle():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    config = tmp_path / "upside-down.toml"
    config.write_text('[tool.importlinter]\nroot_package = "deltatune"\n\n'
                      '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
                      'layers = ["deltatune.errors", "deltatune.cli"]\n')
    result = lint_imports("--config", str(config))
    assert result.returncode == 1
    assert "deltatune.cli is not allowed to import deltatune.errors" in result.stdout
