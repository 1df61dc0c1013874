"""What ``deltatune fit`` prints: none of Lightning's adverts and known noise, the progress bar drawn
before the run's report and never after it, and ``model.evaluators: []`` meaning no evaluator at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deltatune.ui.noise import KNOWN_WARNINGS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-lora.yaml"
NOISE = ("💡 Tip", "litlogger", "tensorboardX", "No seed found", "LeafSpec")


def test_fit_prints_no_known_noise_and_no_bar_after_the_report(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "deltatune.cli.main", "fit", "--config", str(CONFIG),
         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
         "--trainer.logger=true",  # Lightning's default logger: its tensorboardX notice
         "--model.evaluators=[]"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    both = run.stdout + run.stderr
    assert [line for line in both.splitlines() if any(n in line for n in NOISE)] == []
    assert "Trainer.fit` stopped" in run.stderr  # other Lightning lines still show: only known ones are filtered
    out = run.stdout
    assert out.rindex("Epoch 0") < out.index("sample generations") < out.index("adapter written to")
    # an explicit empty list of evaluators: none ran, before or after training, and no metric table
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["base_metrics"] == {} and report["tuned_metrics"] == {}
    assert "base vs tuned" not in out


def test_the_filters_match_the_messages_lightning_prints():
    """Each filtered text still occurs in the installed Lightning (or PyTorch) sources, so a filter that
    no longer matches anything is noticed."""
    import re

    import lightning
    import torch

    sources = "".join(p.read_text(errors="replace") for package in (lightning, torch)
                      for p in Path(package.__file__).parent.rglob("*.py")
                      if any(k in p.name for k in ("seed", "logger_connector", "_pytree")))
    for pattern in KNOWN_WARNINGS:
        assert re.search(pattern, sources), pattern
