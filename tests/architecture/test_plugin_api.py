"""The declared plugin API: plugin packages import ``deltatune.api`` and nothing else of the core,
``deltatune.api`` exports exactly its ``__all__`` (each name documented in the manual), and importing
``deltatune`` itself loads no heavy library."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import deltatune.api
from deltatune.cli.scaffold import KINDS, scaffold

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_PACKAGES = sorted([*ROOT.glob("plugins/*/deltatune_*"), *ROOT.glob("examples/*/deltatune_*")])
ALLOWED = "deltatune.api"


def core_imports_besides_the_api(source: str) -> list[str]:
    """``line: module`` of every import of a core module other than :data:`ALLOWED` in ``source``
    (anywhere: top level, inside functions, ``from deltatune import …`` included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {m}" for m in modules
                  if (m == "deltatune" or m.startswith("deltatune.")) and m != ALLOWED]
    return found


def test_the_check_finds_every_way_of_importing_the_core():
    source = (
        "from deltatune import hookimpl\n"
        "import deltatune.train.loss\n"
        "from deltatune.api import Row\n"
        "import deltatune_other, deltatune.api\n"
        "def later():\n"
        "    from deltatune.deltas.layers import DeltaLinear\n"
    )
    assert core_imports_besides_the_api(source) == [
        "1: deltatune", "2: deltatune.train.loss", "6: deltatune.deltas.layers"]


def test_plugin_packages_import_only_the_api():
    assert len(PLUGIN_PACKAGES) >= 17  # the 16 first-party plugins and the IA3 example
    offenders = {
        str(path.relative_to(ROOT)): problems
        for package in PLUGIN_PACKAGES for path in sorted(package.rglob("*.py"))
        if (problems := core_imports_besides_the_api(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, "plugin packages must import from deltatune.api only"


def test_scaffolded_plugins_import_only_the_api(tmp_path):
    for kind in KINDS:
        folder = scaffold(f"my_{kind}", kind, tmp_path)
        module = folder / f"deltatune_my_{kind}" / "__init__.py"
        assert core_imports_besides_the_api(module.read_text()) == [], kind


def test_the_api_exports_exactly_its_all_and_the_manual_lists_every_name():
    names = deltatune.api.__all__
    assert len(names) == len(set(names))
    missing = [n for n in names if not hasattr(deltatune.api, n)]
    assert missing == []
    public = {n for n in vars(deltatune.api) if n.isidentifier() and not n.startswith("_")}  # pytest adds "@py_…"
    undeclared = public - set(names) - {"annotations"}
    assert undeclared == set(), "public names of deltatune.api outside __all__"
    manual = (ROOT / "docs" / "plugin-authoring.md").read_text(encoding="utf-8")
    assert [n for n in names if not re.search(rf"`{n}\b", manual)] == []  # `name` or `name(...)`


def test_importing_deltatune_loads_no_heavy_library():
    probe = ("import sys, deltatune; "
             "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'pydantic') if m in sys.modules)); "
             "print(deltatune.__all__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "['__version__', 'hookimpl']"
