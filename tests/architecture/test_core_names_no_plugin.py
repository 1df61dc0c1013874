"""The core names no first-party plugin: whatever it needs from a technique comes through a protocol
member of the plugin (:mod:`deltatune.plugin.protocols`), never through ``if name == "nf4"``.

Every ``.py`` file under ``core/deltatune`` is parsed, and it fails on

* an import of a plugin package (``deltatune_<anything>``): the core imports no plugin;
* a string in code that names a first-party plugin the way users and plugins write the names. For
  the names that are no ordinary word (``lora``, ``nf4``, ``adamw``, …): any string equal to one or
  holding one as a whole lower-case word (``name == "nf4"``, ``{"lora": ...}``,
  ``f"requantized to nf4"``, ``"e.g. lora"``). For the names that are ordinary words (``text``,
  ``chat``, ``template``, ``choice``): a string equal to one where a plugin name goes — compared
  with something called ``name``, the value of a ``"name"`` key, a parameter's default, an ``or``
  fallback (``x or ["text"]``) or a keyword argument named after a plugin kind — so that a
  builder's ``chat`` prompt mode or a ``"text"`` field of a data record stay ordinary values.

What it lets through, and why:

* docstrings and comments: they are documentation, where naming the techniques as examples helps a
  reader (``core/deltatune/testing``'s usage example, the estimate's published-figure notes);
* identifiers (``text: str``, ``chat_template``, ``lora_A``): words like ``text`` are ordinary
  vocabulary, and ``lora_A``/``lora_B`` are PEFT's tensor names that the core's shared low-rank
  layer keeps so checkpoints load in PEFT — a name, not a plugin;
* names as parts of longer words (``"use_dora"``, ``"vera_dropout"``, ``"chat_template"``): those
  are PEFT's and transformers' own keys;
* capitalised prose in messages (``"NF4"``, ``"LoRA"``) is a technique mentioned, not a plugin named;
  plugin names are lower case.

The run's defaults (the optimizer, evaluator and dataset builder used when a run names none) are no
exception: the plugin that is the default of its kind says so (``default = True``), the core does not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core" / "deltatune"

WORDS = ("text", "chat", "template", "choice")
"""First-party plugin names that are ordinary words: only a string equal to one is a plugin name."""
DISTINCT = ("lora", "dora", "vera", "bitfit", "nf4", "adamw", "lomo", "adalomo", "alpaca", "perplexity",
            "exact_match", "rouge", "ia3")
"""First-party plugin names that are no ordinary word: a string holding one as a whole word names it."""
AS_WORD = re.compile(r"(?<![\w-])(" + "|".join(DISTINCT) + r")(?![\w-])")


def documentation(tree: ast.AST) -> set[int]:
    """``id`` of every string that is a docstring (a string expression statement)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


KIND_KEYWORDS = {"name", "builder", "delta", "quantizer", "optimizer", "evaluator", "evaluators"}
"""Keyword arguments whose value is a plugin reference."""


def _is_name(node: ast.AST) -> bool:
    """``name``, ``x.name``, ``plugin_name``, …: something holding a plugin's name."""
    text = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return text == "name" or text.endswith("_name")


def plugin_positions(tree: ast.AST) -> set[int]:
    """``id`` of every string constant in a place where a plugin name goes (see the module docstring)."""
    places: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(map(_is_name, [node.left, *node.comparators])):
            places += [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            places += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "name"]
        elif isinstance(node, ast.arguments):
            places += [*node.defaults, *[d for d in node.kw_defaults if d is not None]]
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            places += node.values[1:]
        elif isinstance(node, ast.keyword) and node.arg in KIND_KEYWORDS:
            places.append(node.value)
    found = set()
    for place in places:  # the constant itself, or inside a list/tuple/set there
        items = place.elts if isinstance(place, (ast.List, ast.Tuple, ast.Set)) else [place]
        found |= {id(item) for item in items if isinstance(item, ast.Constant)}
    return found


def plugin_names(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every use of a first-party plugin's name in ``source`` (see the module docstring)."""
    tree = ast.parse(source)
    docs = documentation(tree)
    positions = plugin_positions(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith("deltatune_")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deltatune_"):
            hits.append((node.lineno, f"from {node.module} import …"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if AS_WORD.search(node.value) or (node.value in WORDS and id(node) in positions):
                hits.append((node.lineno, repr(node.value)))
    return hits


def test_the_rule_catches_plugin_names_and_lets_ordinary_code_through():
    caught = ['if name == "nf4":\n    pass', 'X = {"lora": 1}', 'import deltatune_lora', 'from deltatune_nf4 import NF4',
              'f(optimizer="adamw")', 'msg = f"requantized to nf4 {x}"', 'B = {"name": "text"}', 'd = ["perplexity"]',
              'raise E("add a delta method (e.g. lora)")', 'if mode.builder_name == "chat": pass',
              'def f(builder="text"): pass', 'x = evaluators or ["choice"]', 'resolve(kind, name="template")']
    passed = ['def f(text: str) -> str:\n    """Like lora or nf4: a docstring."""\n    return text',
              'K = {"use_dora": False, "vera_dropout": 0.0, "lora_alpha": 8}', 'x.lora_A.weight', 'S = "NF4 in LoRA"',
              'tokenizer.chat_template', 'LABEL = "chat-ml"', '# lora\nY = 1', 'if mode == "chat": pass',
              'Mode = Literal["auto", "chat", "plain"]', 'row = {"text": line}', 'value = record["text"]']
    assert all(plugin_names(code) for code in caught), [c for c in caught if not plugin_names(c)]
    assert not any(plugin_names(code) for code in passed), [(c, plugin_names(c)) for c in passed if plugin_names(c)]


def test_no_core_module_names_a_first_party_plugin():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} core modules under {CORE}"
    found = [f"{path.relative_to(CORE.parent)}:{line}: {what}"
             for path in files for line, what in plugin_names(path.read_text(encoding="utf-8"))]
    assert not found, "the core names first-party plugins:\n" + "\n".join(found)


def test_the_defaults_of_a_run_are_the_plugins_that_declare_themselves_default():
    import types

    import pytest
    from deltatune_adamw import AdamW

    from deltatune import hookimpl
    from deltatune.errors import ConfigError
    from deltatune.plugin.resolve import default_name
    from deltatune.testing import isolated_manager

    installed = isolated_manager()
    assert default_name("optimizer", installed) == "adamw"
    assert default_name("evaluator", installed) == "perplexity"
    assert default_name("dataset_builder", installed) == "alpaca"

    class Inherited(AdamW):  # a subclass of the default is not a second default
        name = "inherited"

    class Rival(AdamW):
        name = "rival"
        default = True

    def module(*classes):
        plugin = types.ModuleType(f"defaults_{len(classes)}")
        plugin.deltatune_register_optimizers = hookimpl(lambda register: [register(c) for c in classes])
        return plugin

    assert default_name("optimizer", isolated_manager(module(Inherited))) == "adamw"
    with pytest.raises(ConfigError, match="adamw and rival all declare themselves the default optimizer"):
        default_name("optimizer", isolated_manager(module(Inherited, Rival)))
    with pytest.raises(ConfigError, match="no installed optimizer declares itself the default"):
        default_name("optimizer", isolated_manager(module(Inherited), entry_points_too=False))
