"""LOMO and AdaLomo through the real Lightning Trainer: full fine-tuning, step counting, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.io.adapter import load_adapter, read_manifest
from deltatune.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-lora.yaml"
FULL = ["--model.delta=[]", "--model.samples=0", "--trainer.max_steps=6"]


@pytest.mark.parametrize("optimizer", ["{name: lomo, config: {lr: 0.05}}",
                                       "{name: adalomo, config: {lr: 0.01, clip_grad_norm: 1.0}}"])
def test_fused_full_fine_tune_counts_steps_lowers_loss_and_saves_the_model(tmp_path, optimizer):
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                 f"--model.optimizer={optimizer}", *FULL])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 6
    assert report["tuned_metrics"]["validation"]["perplexity/loss"] < report["base_metrics"]["validation"]["perplexity/loss"]
    manifest = read_manifest(tmp_path / "adapter")
    assert manifest["delta"] == [] and manifest["weights"] == "model"
    model, resolved = load_adapter(tmp_path / "adapter")
    assert resolved.full_finetune and (tmp_path / "adapter" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("option, fragment", [
    ("--trainer.accumulate_grad_batches=2", "accumulate_grad_batches=2"),
    ("--trainer.gradient_clip_val=1.0", "clip_grad_norm"),
    ("--trainer.devices=2 --trainer.strategy=ddp", "world_size=2"),
])
def test_settings_a_fused_update_cannot_honour_are_refused_before_training(tmp_path, capsys, option, fragment):
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                 "--model.optimizer={name: lomo}", *FULL, *option.split()])
    assert code == 1
    out = capsys.readouterr().err
    assert "lomo" in out and fragment in out
    assert not (tmp_path / "adapter").exists()
