"""``deltatune new-plugin NAME --kind KIND``: scaffold a plugin package.

The package it writes is complete and installable from the first minute::

    deltatune-NAME/
        pyproject.toml             # [project.entry-points.deltatune] NAME = "deltatune_NAME"
        README.md
        deltatune_NAME/__init__.py # the plugin class, its Config and the hook, with TODOs
        tests/test_contract.py     # deltatune.testing's contract for KIND, on the in-process module

Its contract tests run at once (``cd deltatune-NAME && pytest``; the package need not be installed,
the tests register the module in-process) and fail — ``NotImplementedError`` naming what to write —
until the plugin is implemented. ``pip install -e deltatune-NAME`` then makes the plugin appear in
``deltatune plugins``.

The file texts are package data under ``templates/`` (``str.format`` templates over the fields built in
:func:`scaffold`; literal braces are doubled): one per kind for the module and for its contract test,
each preceded by the shared header of that file.
"""

from __future__ import annotations

import argparse
import re
from importlib import resources
from pathlib import Path

from deltatune import __version__
from deltatune.errors import ConfigError
from deltatune.plugin.protocols import PLUGIN_KINDS

KINDS = tuple(PLUGIN_KINDS)
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _template(part: str) -> str:
    """The text of ``templates/PART.tmpl`` (package data), a ``str.format`` template over the scaffold's fields."""
    return resources.files("deltatune.cli").joinpath("templates", f"{part}.tmpl").read_text(encoding="utf-8")


def _core_requirement() -> str:
    major, minor = (__version__.split(".") + ["0"])[:2]
    return f"deltatune>={major}.{minor},<{major}.{int(minor) + 1}" if major.isdigit() and minor.isdigit() else "deltatune"


def scaffold(name: str, kind: str, parent: Path | str = ".") -> Path:
    """Write the package ``deltatune-NAME`` for a plugin of ``kind`` under ``parent``; return its folder.

    Raises :class:`ConfigError` for an invalid name or kind, or when the folder exists and is not empty.
    """
    if not NAME.match(name):
        raise ConfigError(f"plugin name '{name}' must be lower case letters, digits and '_', starting with a letter")
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind '{kind}'; choose one of {', '.join(KINDS)}")
    folder = Path(parent) / f"deltatune-{name}"
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} already exists and is not empty; choose another name or folder")
    label = PLUGIN_KINDS[kind].label
    fields = {"name": name, "cls": _class_name(name), "kind": kind, "label": label,
              "label_cap": label.capitalize(), "contract": PLUGIN_KINDS[kind].contract,
              "core": _core_requirement(), "summary": f"A deltatune {label}: {name}"}
    outputs = {
        Path("pyproject.toml"): ["pyproject.toml"],
        Path("README.md"): ["README.md"],
        Path(f"deltatune_{name}") / "__init__.py": ["module_header.py", f"module/{kind}.py"],
        Path("tests") / "test_contract.py": ["contract_header.py", f"contract/{kind}.py"],
    }
    for target, parts in outputs.items():
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        (folder / target).write_text("".join(_template(part).format(**fields) for part in parts))
    return folder


def cmd_new_plugin(args: argparse.Namespace) -> None:
    """``deltatune new-plugin``: write the package and say what to do next."""
    from deltatune.ui.console import console

    folder = scaffold(args.name, args.kind, args.dir)
    console.print(f"wrote {folder}/ (a {PLUGIN_KINDS[args.kind].label} plugin '{args.name}')", highlight=False)
    console.print(f"next: cd {folder} && pytest   # contract tests fail until the TODOs in "
                  f"deltatune_{args.name}/__init__.py are done; then pip install -e {folder}", highlight=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``new-plugin`` to the ``deltatune`` command's subparsers."""
    parser = sub.add_parser("new-plugin", help="scaffold a plugin package (pyproject, module, contract tests)")
    parser.add_argument("name", help="the plugin's registered name (lower case, e.g. my_method)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="the kind of plugin: " + ", ".join(KINDS))
    parser.add_argument("--dir", default=".", help="where to create deltatune-NAME/ (default: here)")
    parser.set_defaults(func=cmd_new_plugin)
