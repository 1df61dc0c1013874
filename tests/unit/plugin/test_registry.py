"""registry.toml: valid against its schema and in agreement with the installed entry points."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pydantic import ValidationError

from deltatune import __version__
from deltatune.plugin.manager import load_plugins
from deltatune.plugin.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parents[3]


def test_registry_lists_exactly_the_first_party_plugins_and_they_are_installed():
    registry = load_registry(ROOT / "registry.toml")
    first_party = {e.name: e for e in registry.plugin if e.path and Path(e.path).parts[0] == "plugins"}
    folders = {p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file()}
    assert {Path(e.path).name for e in first_party.values()} == folders
    manager = load_plugins()
    installed = {(i.kind, i.name): i for i in manager.all()}
    for entry in registry.plugin:
        info = installed.get((entry.kind, entry.name))
        assert info is not None, f"{entry.name} is in registry.toml but not installed"
        assert info.distribution == entry.distribution
        assert entry.supports(__version__), f"{entry.name} does not support core {__version__}"
    group = {ep.name: ep for ep in entry_points(group="deltatune")}
    for entry in first_party.values():
        assert entry.distribution == group[Path(entry.path).name].dist.name


def test_third_party_entries_with_a_path_point_at_their_package_folder():
    """A vetted third-party plugin shipped in this repository (the scaled-activations example) lies outside plugins/;
    its folder's pyproject names the registered distribution and the entry point."""
    import tomllib

    registry = load_registry(ROOT / "registry.toml")
    outside = [e for e in registry.plugin if e.path and Path(e.path).parts[0] != "plugins"]
    assert [e.name for e in outside] == ["scaled_activations"]
    for entry in outside:
        project = tomllib.loads((ROOT / entry.path / "pyproject.toml").read_text())["project"]
        assert project["name"] == entry.distribution
        assert entry.name in project["entry-points"]["deltatune"]
        assert entry.install_command() == f"pip install -e {entry.path}"


def test_registry_schema_rejects_bad_entries():
    with pytest.raises(ValidationError, match="kind"):
        Registry.model_validate({"plugin": [{"name": "x", "kind": "nonsense", "distribution": "d",
                                             "summary": "s", "core": ">=0.1"}]})
    with pytest.raises(ValidationError):
        Registry.model_validate({"plugin": [{"name": "x", "kind": "evaluator", "distribution": "d",
                                             "summary": "s", "core": "not a specifier"}]})
