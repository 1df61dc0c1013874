"""Helpers of the fault-injection suite: ``deltatune fit`` as a subprocess with a fault injected
(:mod:`inject`), and what the tests assert about its results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "tiny-lora.yaml"
STEPS = 8
"""Steps of every run; checkpoints every 2 steps; 6 batches an epoch."""
RUN = ["--seed_everything=0", "--model.compare_base=false", "--model.samples=0",
       "--checkpoint.every_n_train_steps=2", f"--trainer.max_steps={STEPS}"]


def fit(root: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``deltatune fit`` on the tiny config in ``root`` (``fault``: a callback of :mod:`inject`)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("DELTATUNE_DEBUG", None)
    faults = [f"--trainer.callbacks+=inject.{fault}"] if fault else []
    command = [sys.executable, "-m", "deltatune.cli.main", "fit", "--config", str(CONFIG),
               f"--trainer.default_root_dir={root}", *RUN, *faults, *extra]
    # a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # the Ctrl+C fault needs the default disposition whoever started the suite
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def adapter_tensors(root: Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter ``fit`` wrote in ``root``."""
    return load_file(str(root / "adapter" / "adapter.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit."""
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the adapters differ"


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 1, an ``error:`` line naming ``words``, and no traceback; returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def step_of(checkpoint: Path) -> int:
    """The global step a checkpoint was written at (it must load)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
