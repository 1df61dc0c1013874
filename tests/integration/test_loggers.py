"""Every metric a run computes reaches the configured Lightning loggers: a tiny real ``deltatune fit``
with ``--trainer.logger`` CSVLogger (and TensorBoardLogger, MLFlowLogger where they are installed) whose logs
hold the evaluators' results per evaluation set before and after training (the same values as
report.json), the learning rate, tokens per second and peak memory of every step."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from deltatune.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests/configs/tiny-lora.yaml"
EVALUATORS = "--model.evaluators=[{name: perplexity}, {name: exact_match}]"


def fit(tmp_path: Path, logger: str) -> dict:
    run = tmp_path / "run"
    code = main(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={run}", "--trainer.max_steps=3",
                 f"--trainer.logger={logger}", "--trainer.log_every_n_steps=1",
                 EVALUATORS, "--model.samples=0"])
    assert code == 0
    return json.loads((run / "report.json").read_text())


def test_csv_logger_gets_evaluator_metrics_lr_tokens_per_second_and_memory(tmp_path):
    report = fit(tmp_path, "CSVLogger")
    [metrics_file] = (tmp_path / "run").glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    columns = set(rows[0])
    logged: dict[str, float] = {}
    for row in rows:
        logged.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    for phase, metrics in (("base", report["base_metrics"]), ("tuned", report["tuned_metrics"])):
        assert metrics["validation"], metrics
        for split, values in metrics.items():
            for name, value in values.items():
                assert logged[f"{phase}/{split}/{name}"] == pytest.approx(value), (phase, split, name)
    assert {"base/validation/perplexity/perplexity", "tuned/validation/exact_match/accuracy"} <= columns
    for column in ("train_loss", "lr", "tokens_per_s", "peak_memory_gib"):
        assert column in columns
    steps = [row for row in rows if row["lr"]]
    assert len(steps) == 3
    assert all(float(row["tokens_per_s"]) > 0 and float(row["peak_memory_gib"]) > 0 for row in steps)
    assert [float(row["train_loss"]) for row in steps] == pytest.approx([loss for _, loss in report["history"]["train"]])


def test_tensorboard_logger_gets_the_same_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = fit(tmp_path, "TensorBoardLogger")
    [events] = (tmp_path / "run").glob("lightning_logs/version_*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    expected = {f"{phase}/validation/{name}" for phase in ("base", "tuned")
                for name in report["tuned_metrics"]["validation"]}
    assert expected <= tags and {"lr", "tokens_per_s", "peak_memory_gib", "train_loss"} <= tags, tags


def test_mlflow_logger_gets_the_same_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to write a local file store
    report = fit(tmp_path, "MLFlowLogger")
    [metrics] = (tmp_path / "run").glob("*/*/metrics")  # the file store in the run folder: experiment/run/metrics
    logged = {str(path.relative_to(metrics)) for path in metrics.rglob("*") if path.is_file()}
    expected = {f"{phase}/validation/{name}" for phase in ("base", "tuned")
                for name in report["tuned_metrics"]["validation"]}
    assert expected <= logged and {"lr", "tokens_per_s", "peak_memory_gib", "train_loss"} <= logged, logged
