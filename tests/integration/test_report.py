"""A tiny run with the chat builder, packing, an extra evaluation set and several evaluators; then
``deltatune report`` on it, alone and side by side; ``validate``/``test`` print the evaluator table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deltatune.cli.main import main
from deltatune.train.report import RunReport

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-chat-packed.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "chat-packed"
    assert main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={root}"]) == 0
    return root


def test_fit_reports_every_set_and_evaluator_base_and_tuned(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    for which in ("base_metrics", "tuned_metrics"):
        metrics = report[which]
        assert set(metrics) == {"validation", "test", "heldout", "choices"}
        assert {"perplexity/loss", "exact_match/accuracy", "rouge/rougeL"} <= set(metrics["test"])
        assert "exact_match/accuracy" in metrics["heldout"] and "rouge/rougeL" not in metrics["heldout"]
        assert metrics["test"]["exact_match/rows"] == 8.0
        assert metrics["choices"]["choice/rows"] == 8.0 and "choice/accuracy_norm" in metrics["choices"]
    assert report["tuned_metrics"]["validation"]["perplexity/loss"] < report["base_metrics"]["validation"]["perplexity/loss"]
    assert report["steps"] == 6 and len(report["history"]["train"]) == 6
    assert [step for step, _ in report["history"]["validation"]] == [3, 6]
    batches = report["batches"]
    assert batches["examples"] == 64 and batches["rows"] < 64 and 0 <= batches["padding"] < 0.5
    assert set(report["timings"]) == {"base_eval_s", "train_s", "tuned_eval_s", "total_s"}
    assert report["method"].startswith("lora")
    assert (run_dir / "losses.png").read_bytes().startswith(PNG)


def test_report_command_prints_and_plots_one_run(run_dir, capsys, tmp_path):
    plot = tmp_path / "one.png"
    assert main(["report", str(run_dir), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "base vs tuned" in out and "heldout" in out and "exact_match/accuracy" in out
    assert plot.read_bytes().startswith(PNG)


def test_report_command_compares_runs_side_by_side(run_dir, capsys, tmp_path):
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    data = json.loads((other / "report.json").read_text())
    data["name"] = "other-run"
    data["tuned_metrics"]["test"]["exact_match/accuracy"] = 0.625
    (other / "report.json").write_text(json.dumps(data))
    plot = tmp_path / "both.png"
    assert main(["report", str(run_dir), str(other), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "runs compared" in out and "chat-packed" in out and "other-run" in out and "0.6250" in out
    assert plot.read_bytes().startswith(PNG)
    assert RunReport.read(other).value("tuned", "test", "exact_match/accuracy") == 0.625


def test_report_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no run report" in capsys.readouterr().err


def test_validate_and_test_commands_run_the_evaluators(run_dir, capsys):
    common = ["--config", str(CONFIG), f"--trainer.default_root_dir={run_dir}",
              f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]
    assert main(["validate", *common]) == 0
    out = capsys.readouterr().out
    assert "perplexity/loss" in out and "validation" in out
    assert main(["test", *common]) == 0
    out = capsys.readouterr().out
    assert "exact_match/accuracy" in out and "heldout" in out and "choice/accuracy" in out
