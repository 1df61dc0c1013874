"""Meta-tests (after datasette's): every hook specification is documented and tested.

*Documented*: it has a docstring naming its protocol, and ``docs/plugin-authoring.md`` has a section
``### `hook_name``` that names every member of the protocol (required and optional) and the kind's
contract class.
*Tested*: ``deltatune.testing`` has a contract for the hook's plugin kind, and some test module of the
repository subclasses it. The checks are functions, run here on the real hook specifications and on
a made-up specification module, so that they demonstrably fail.
"""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pluggy

from deltatune.plugin import hookspecs
from deltatune.plugin.protocols import PLUGIN_KINDS, required_members
from deltatune.testing import CONTRACTS, contract_subclasses

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugin-authoring.md"
TEST_ROOTS = [ROOT / "tests", ROOT / "plugins", ROOT / "examples"]
KIND_FOR_HOOK = {spec.hook: kind for kind, spec in PLUGIN_KINDS.items()}


def hook_specs(module: types.ModuleType) -> dict[str, object]:
    """The functions of ``module`` marked as deltatune hook specifications."""
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(fn) and hasattr(fn, "deltatune_spec")}


def doc_sections(text: str) -> dict[str, str]:
    """``{hook name: section text}`` for every ``### `name``` heading of the manual."""
    parts = re.split(r"^### `(\w+)`\s*$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def undocumented(specs: dict[str, object], text: str) -> list[str]:
    """Problems that make a hook count as undocumented (empty when all is well)."""
    problems = []
    sections = doc_sections(text)
    for name, fn in specs.items():
        kind = KIND_FOR_HOOK.get(name)
        protocol = PLUGIN_KINDS[kind].protocol if kind else None
        doc = inspect.getdoc(fn) or ""
        if protocol is None:
            problems.append(f"{name}: no plugin kind / protocol is known for it")
            continue
        if protocol.__name__ not in doc:
            problems.append(f"{name}: its docstring does not name its protocol {protocol.__name__}")
        section = sections.get(name)
        if section is None:
            problems.append(f"{name}: no '### `{name}`' section in {DOC.name}")
            continue
        for member in [*required_members(protocol), *PLUGIN_KINDS[kind].optional]:
            if f"`{member}" not in section:
                problems.append(f"{name}: the section does not document `{member}` of {protocol.__name__}")
        if CONTRACTS.get(kind) and CONTRACTS[kind].__name__ not in section:
            problems.append(f"{name}: the section does not name its contract {CONTRACTS[kind].__name__}")
    return problems


def untested(specs: dict[str, object], roots: list[Path]) -> list[str]:
    """Problems that make a hook count as untested (empty when all is well)."""
    used = {base for _, _, base in contract_subclasses(roots)}
    problems = []
    for name in specs:
        contract = CONTRACTS.get(KIND_FOR_HOOK.get(name, ""))
        if contract is None:
            problems.append(f"{name}: deltatune.testing has no contract for its plugin kind")
        elif contract.__name__ not in used:
            problems.append(f"{name}: no test module subclasses {contract.__name__}")
    return problems


def test_every_hook_specification_is_documented():
    specs = hook_specs(hookspecs)
    assert list(specs) == [spec.hook for spec in PLUGIN_KINDS.values()], "PLUGIN_KINDS lists the hooks in their order"
    assert undocumented(specs, DOC.read_text(encoding="utf-8")) == []


def test_every_hook_specification_is_tested_by_a_contract_some_plugin_passes():
    assert undocumented is not untested
    assert untested(hook_specs(hookspecs), TEST_ROOTS) == []


def test_every_first_party_plugin_runs_its_contract():
    subclassed = {path.relative_to(ROOT).parts[:2] for path, _, _ in contract_subclasses([ROOT / "plugins"])}
    folders = {("plugins", p.name) for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file()}
    assert folders - subclassed == set(), "these plugins do not subclass a deltatune.testing contract"


def test_the_checks_fail_for_an_undocumented_untested_hook_and_for_a_thin_section():
    hookspec = pluggy.HookspecMarker("deltatune")
    fake = types.ModuleType("fake_hookspecs")

    @hookspec
    def deltatune_register_tokenizers(register):
        """Register tokenizers."""

    @hookspec
    def deltatune_register_evaluators(register):
        """Register evaluators."""

    fake.deltatune_register_tokenizers = deltatune_register_tokenizers
    fake.deltatune_register_evaluators = deltatune_register_evaluators
    specs = hook_specs(fake)
    thin = "### `deltatune_register_evaluators`\n\nEvaluators compute metrics.\n"
    problems = undocumented(specs, thin)
    assert any("tokenizers: no plugin kind" in p for p in problems)
    assert any("does not name its protocol Evaluator" in p for p in problems)
    assert any("does not document `evaluate`" in p for p in problems)
    assert any("does not name its contract EvaluatorContract" in p for p in problems)
    assert undocumented({"deltatune_register_evaluators": hookspecs.deltatune_register_evaluators}, "") == [
        f"deltatune_register_evaluators: no '### `deltatune_register_evaluators`' section in {DOC.name}"]
    assert untested(specs, [ROOT / "docs"]) == [
        "deltatune_register_tokenizers: deltatune.testing has no contract for its plugin kind",
        "deltatune_register_evaluators: no test module subclasses EvaluatorContract",
    ]
