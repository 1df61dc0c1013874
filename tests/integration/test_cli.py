"""The ``deltatune`` command: plugin listing, clear errors (generation and chat: test_chat_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-lora.yaml"


def test_plugins_json_lists_installed_plugins_with_distributions(capsys):
    for check in ([], ["--check"]):  # from metadata, and loaded: the same plugins
        assert main(["plugins", "--json", *check]) == 0
        listing = json.loads(capsys.readouterr().out)
        names = {(p["kind"], p["name"]): p for p in listing["installed"]}
        assert names[("delta_method", "lora")]["distribution"] == "deltatune-lora"
        assert names[("dataset_builder", "alpaca")]["version"] == "0.1.0"
    assert listing["failed"] == []


def test_plugins_listing_imports_no_plugin_and_no_torch():
    """`deltatune plugins` answers from entry-point metadata and registry.toml; `--check` imports them."""
    probe = ("import sys; from deltatune.cli.main import main; main(sys.argv[1:]); "
             "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', "
             "'transformers') or m.startswith('deltatune_')), file=sys.stderr)")
    light = subprocess.run([sys.executable, "-c", probe, "plugins"], capture_output=True, text=True, check=True)
    assert "IMPORTED []" in light.stderr and "lora" in light.stdout
    checked = subprocess.run([sys.executable, "-c", probe, "plugins", "--check"], capture_output=True, text=True,
                             check=True)
    assert "'deltatune_lora'" in checked.stderr


def test_version_and_top_level_help_are_light_and_clean():
    from deltatune import __version__

    probe = ("import atexit, sys; atexit.register(lambda: print('HEAVY', 'torch' in sys.modules, file=sys.stderr)); "
             "from deltatune.cli.main import main; main(sys.argv[1:])")
    version = subprocess.run([sys.executable, "-c", probe, "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"deltatune {__version__}" and "HEAVY False" in version.stderr
    top = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True)
    assert "HEAVY False" in top.stderr and "``" not in top.stdout and "fit" in top.stdout


def test_plugins_lists_registry_entries_that_are_not_installed(capsys, monkeypatch):
    monkeypatch.setenv("DELTATUNE_DISABLE_PLUGINS", "lora")
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    missing = {p["name"]: p for p in listing["not_installed"]}
    assert missing["lora"]["install"] == "pip install -e plugins/lora"
    assert main(["plugins"]) == 0
    assert "not installed" in capsys.readouterr().out


def test_fit_with_an_unknown_plugin_fails_clearly_before_loading_anything(capsys, tmp_path):
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                 "--model.delta=[{name: lorra}]"])
    out = capsys.readouterr().err
    assert code == 1
    assert "unknown delta method 'lorra'" in out and "lora" in out
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad configuration"


@pytest.mark.parametrize("option, expected", [
    ("--model.delta=[{name: lora, config: {dropout: 2}}]", "dropout: Input should be less than 1"),
    ("--data.builder={name: alpaca, config: {path: x.jsonl, template: vicuna}}", "'auto', 'chat' or 'alpaca'"),
])
def test_fit_with_an_invalid_option_names_plugin_and_field(capsys, tmp_path, option, expected):
    assert main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", option]) == 1
    assert expected in capsys.readouterr().err


def test_generate_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "hi"]) == 1
    assert "not a deltatune adapter" in capsys.readouterr().err


def test_a_step_bounded_fit_labels_its_progress_bar_with_the_step_budget(tmp_path):
    """Lightning labels a ``max_steps`` run ``Epoch 0/-2`` (``max_epochs`` is -1); ours says the budget."""
    from deltatune.ui.progress import RunProgressBar

    labels: list[str] = []
    original = RunProgressBar._get_train_description

    def record(self, current_epoch: int) -> str:
        labels.append(original(self, current_epoch))
        return labels[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunProgressBar, "_get_train_description", record)
        code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", "--model.samples=0",
                     "--trainer.max_steps=3"])
    assert code == 0 and labels
    assert {label.strip() for label in labels} == {"Epoch 0 · 3 steps"}
