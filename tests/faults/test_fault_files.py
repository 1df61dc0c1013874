"""Damaged files of every kind deltatune reads — checkpoint, adapter weights, adapter manifest, run
report, data file, GGUF model — each give one clear error line naming the file, and are left as they
were (nothing is rewritten or deleted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_output import error_line

from faults.faultrun import CONFIG, RUN
from deltatune.cli.main import main


def damage(path: Path, how: str) -> bytes:
    """Truncate ``path`` to half its size, or replace it with garbage; return the damaged bytes."""
    data = path.read_bytes()
    damaged = data[: len(data) // 2] if how == "truncated" else bytes(range(256)) * 8
    path.write_bytes(damaged)
    return damaged



@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run folder, free to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_checkpoint(run, capsys, how):
    damaged = damage(run / "checkpoints" / "last.ckpt", how)
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={run}", *RUN,
                 "--trainer.max_steps=10", "--ckpt_path=last"])
    assert code == 1
    line = error_line(capsys)
    assert "last.ckpt" in line and "damaged or truncated" in line
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == damaged


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi", "--max_new_tokens", "2"], ["export"]])
@pytest.mark.parametrize("name, how, says", [
    ("adapter.safetensors", "truncated", "damaged"),
    ("adapter.safetensors", "garbage", "damaged"),
    ("deltatune.json", "truncated", "is damaged"),
    ("deltatune.json", "garbage", "is damaged"),
])
def test_damaged_adapter(run, tmp_path, capsys, command, name, how, says):
    damaged = damage(run / "adapter" / name, how)
    out = ["--out", str(tmp_path / "exported")] if command == ["export"] else []
    assert main([*command, "--adapter", str(run / "adapter"), *out]) == 1
    line = error_line(capsys)
    assert name in line and says in line
    assert (run / "adapter" / name).read_bytes() == damaged
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_report(run, capsys, how):
    damaged = damage(run / "report.json", how)
    assert main(["report", str(run)]) == 1
    assert "report.json" in error_line(capsys)
    assert (run / "report.json").read_bytes() == damaged


def test_truncated_data_file(run, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    lines = (Path(__file__).parents[2] / "examples" / "data" / "tasks-train.jsonl").read_text().splitlines()[:20]
    data.write_text("\n".join(lines) + "\n" + lines[20 - 1][: 15])  # the last record cut off mid-write
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path / 'new'}", *RUN,
                 f"--data.builder={{name: alpaca, config: {{path: {data}}}}}"])
    assert code == 1
    line = error_line(capsys)
    assert f"{data}:21" in line and "not valid JSON" in line


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_gguf(tmp_path, capsys, how):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    damaged = damage(model, how)
    assert main(["generate", "--base", str(model), "--prompt", "hi", "--max_new_tokens", "2"]) == 1
    assert "model.gguf" in error_line(capsys)
    assert model.read_bytes() == damaged
