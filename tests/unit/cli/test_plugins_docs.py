"""``deltatune plugins show`` and the generated plugins page: every option documented from the plugin's
own pydantic model, a YAML snippet that is a valid run configuration, and docs/plugins.md kept current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deltatune.cli.main import main
from deltatune.cli.plugins import docs_markdown, plugin_doc
from deltatune.errors import OutputError
from deltatune.plugin.manager import get_plugin_manager
from deltatune.plugin.protocols import PLUGIN_KINDS
from deltatune.plugin.registry import load_registry
from deltatune.plugin.resolve import resolve

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "plugins.md"


def test_plugins_page_is_current():
    assert PAGE.read_text() == docs_markdown(), (
        "docs/plugins.md is stale: run `deltatune plugins docs --write docs/plugins.md` and commit it")


def test_show_json_documents_every_option_from_the_pydantic_model(capsys):
    assert main(["plugins", "show", "lora", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "delta_method"
    assert shown["distribution"] == {"name": "deltatune-lora", "version": "0.1.0"}
    options = {o["name"]: o for o in shown["options"]}
    assert options["r"]["type"] == "int" and options["r"]["default"] == 8
    assert options["r"]["description"] == "rank of the update" and options["r"]["constraints"] == ["> 0"]
    assert options["targets"]["default"] == ["q_proj", "v_proj"]
    assert yaml.safe_load(shown["yaml"])["model"]["delta"][0]["name"] == "lora"
    assert main(["plugins", "show", "alpaca", "--json"]) == 0
    options = {o["name"]: o for o in json.loads(capsys.readouterr().out)["options"]}
    assert options["template"]["allowed"] == ["auto", "chat", "alpaca"]
    assert options["path"]["required"] is True


def test_show_prints_options_and_snippet(capsys):
    assert main(["plugins", "show", "lora"]) == 0
    out = capsys.readouterr().out
    assert "delta method" in out and "deltatune-lora" in out
    assert "list[str] | str" in out  # types are not swallowed as console markup
    assert "model:\n  delta:\n  - name: lora" in out


def test_show_an_unknown_plugin_is_one_line_naming_the_installed_ones(capsys):
    assert main(["plugins", "show", "rank"]) == 1
    err = capsys.readouterr().err
    assert "no installed plugin is named 'rank'" in err and "lora" in err and len(err.strip().splitlines()) == 1


def test_every_first_party_option_has_a_description():
    registry = load_registry()
    missing = [f"{info.name}.{field}" for info in get_plugin_manager().all() if registry.find(info.kind, info.name)
               for field, spec in info.cls.Config.model_fields.items() if not spec.description]
    assert missing == []


@pytest.mark.parametrize("kind", list(PLUGIN_KINDS))
def test_snippets_are_valid_run_configurations(kind, monkeypatch):
    """Each snippet (but those with a required option) resolves through the same validation a run uses."""
    monkeypatch.setenv("DELTATUNE_ALLOW_CODE_EXECUTION", "1")  # humaneval's opt-in, validated with its options
    if PLUGIN_KINDS[kind].run_option is None:  # the core chooses such a plugin: no run option names it
        for name in get_plugin_manager().names(kind):
            assert plugin_doc(name, kind).snippet().startswith("# not named in a run configuration")
        return
    for name in get_plugin_manager().names(kind):
        doc = plugin_doc(name, kind)
        section, option = PLUGIN_KINDS[kind].run_option.split(".")
        ref = yaml.safe_load(doc.snippet())[section][option]
        ref = ref[0] if PLUGIN_KINDS[kind].listed else ref
        if any(o.required for o in doc.options):
            continue  # a placeholder stands where the user must write a value
        assert resolve(kind, ref).cfg == resolve(kind, name).cfg


def test_docs_write_replaces_its_own_page_only(tmp_path, capsys):
    page = tmp_path / "plugins.md"
    assert main(["plugins", "docs", "--write", str(page)]) == 0
    assert page.read_text() == docs_markdown()
    assert main(["plugins", "docs", "--write", str(page)]) == 0  # its own page: replaced
    mine = tmp_path / "notes.md"
    mine.write_text("my notes\n")
    with pytest.raises(OutputError, match="not written by `deltatune plugins docs`"):
        from deltatune.cli.plugins import cmd_docs
        import argparse

        cmd_docs(argparse.Namespace(write=str(mine)))
    assert mine.read_text() == "my notes\n"
