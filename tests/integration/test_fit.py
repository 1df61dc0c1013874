"""End to end through the real CLI and Lightning Trainer on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from deltatune.io.adapter import load_adapter, read_manifest
from deltatune.cli.main import main
from deltatune.data.module import collate
from deltatune.model.loading import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-lora.yaml"


def fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run ``deltatune fit`` on the tiny config in a subprocess (as a user would)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "-m", "deltatune.cli.main", "fit", "--config", str(CONFIG),
               f"--trainer.default_root_dir={tmp_path}", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_fit_lowers_loss_saves_adapter_and_reload_gives_identical_logits(tmp_path, capsys):
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_steps=30", "--model.samples=0"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 30
    assert report["tuned_metrics"]["validation"]["perplexity/loss"] < report["base_metrics"]["validation"]["perplexity/loss"] - 0.2
    out = capsys.readouterr().out
    assert "base vs tuned" in out and "perplexity/loss" in out

    adapter = tmp_path / "adapter"
    manifest = read_manifest(adapter)
    assert manifest["delta"][0]["name"] == "lora" and manifest["delta"][0]["distribution"] == "deltatune-lora"
    assert (adapter / "adapter.safetensors").stat().st_size < 100_000
    assert not list(tmp_path.glob(".adapter*")), "no temporary folder may be left behind"

    model, _ = load_adapter(adapter)
    again, _ = load_adapter(adapter)
    tokenizer = tiny_tokenizer()
    rows = [{"input_ids": tokenizer("reverse: a b c")["input_ids"], "labels": [0]}]
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        assert torch.equal(logits, again(input_ids=batch["input_ids"]).logits)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(".deltas.lora." in key for key in checkpoint["state_dict"]), "checkpoints hold only trainable tensors"
    # the adapter reproduces the trained model's logits: compare with the weights in the checkpoint
    trained = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    crash = ["--trainer.callbacks+=crash_callback.CrashAfterStep", "--trainer.callbacks.step=5",
             "--checkpoint.every_n_train_steps=2", "--trainer.max_steps=8", "--model.compare_base=false",
             "--model.samples=0"]
    killed = fit(tmp_path, *crash)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "adapter").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    resumed = fit(tmp_path, "--ckpt_path=last", "--checkpoint.every_n_train_steps=2", "--trainer.max_steps=8",
                  "--model.compare_base=false", "--model.samples=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 8
    assert (tmp_path / "adapter" / "deltatune.json").is_file()
