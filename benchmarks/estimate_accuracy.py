"""How well ``deltatune estimate`` predicts: short real ``deltatune fit`` runs of SmolLM2-135M, each
in a fresh process whose peak resident memory (``VmHWM``) is read back, against the estimate.

``python -m benchmarks.estimate_accuracy`` prints the table of ``docs/scale-out.md`` for this machine;
``tests/unit/estimate/test_estimate.py`` runs the same :data:`VALIDATION_RUNS` (marked ``measured``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.estimate.memory import CPU_RUNTIME_BYTES, MIB, Estimate, estimate


@dataclass(frozen=True)
class Run:
    """A short ``deltatune fit`` whose peak resident memory is measured in a fresh process."""

    name: str
    base: str
    delta: tuple[dict[str, Any], ...] = ({"name": "lora", "config": {"r": 8, "targets": "all-linear"}},)
    quantizer: dict[str, Any] | None = None
    batch: int = 4
    seq: int = 128
    steps: int = 2
    base_dtype: str = "auto"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "config": {"lr": 1e-3}})

    def estimate(self) -> Estimate:
        """The estimate of this run on this machine's CPU."""
        # the text builder labels every token of a row but the first (next-token prediction)
        return estimate(self.base, list(self.delta), self.quantizer, self.optimizer, self.batch, self.seq, 1,
                        "cpu", base_dtype=self.base_dtype, labelled=(self.seq - 1) / self.seq)


_LORA16 = ({"name": "lora", "config": {"r": 16, "targets": "all-linear"}},)
VALIDATION_RUNS = (
    Run("LoRA r=16 all-linear, bf16 base, AdamW, 4 x 256", "smollm2-135m-instruct", delta=_LORA16, seq=256),
    Run("QLoRA: NF4-DQ + LoRA r=16 all-linear, AdamW, 4 x 256", "smollm2-135m-instruct", delta=_LORA16,
        quantizer={"name": "nf4"}, seq=256),
    Run("full fine-tune, fp32, AdamW, 2 x 128", "smollm2-135m-instruct", delta=(), batch=2),
    Run("full fine-tune, fp32, LOMO, 2 x 128", "smollm2-135m-instruct", delta=(), batch=2,
        optimizer={"name": "lomo", "config": {"lr": 1e-2}}),
)
"""SmolLM2-135M runs whose measured peaks ``tests/unit/estimate/test_estimate.py`` and ``docs/scale-out.md`` compare
the estimator with (``python -m benchmarks.estimate_accuracy`` prints the table)."""

_DRIVER = """
import sys
from deltatune.cli.main import main
code = main(["fit", "--config", sys.argv[1]])
status = open("/proc/self/status").read().split("\\n")
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(f"VmHWM {peak}")
sys.exit(code)
"""


def _text(words: int, seed: int = 0) -> str:
    """Deterministic English-like text for the ``text`` builder."""
    import random

    vocabulary = ("the quick brown fox jumps over a lazy dog while seven wizards quietly mix bright potions "
                  "in old copper kettles near the river bank under grey autumn skies").split()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"


def run_config(run: Run, folder: Path) -> Path:
    """Write the data and the YAML of ``run`` under ``folder``; return the YAML."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.txt"
    rows = run.batch * (run.steps + 2)  # every row exactly seq tokens (byte-level: more words than needed)
    data.write_text(_text(rows * run.seq))
    config = {
        "seed_everything": 0,
        "model": {"base": run.base, "base_dtype": run.base_dtype, "delta": list(run.delta),
                  "quantizer": run.quantizer, "optimizer": run.optimizer,
                  "compare_base": False, "samples": 0},
        "data": {"builder": {"name": "text", "config": {"path": str(data), "max_length": run.seq,
                                                        "drop_last": True, "limit": rows}},
                 "batch_size": run.batch, "eval_batch_size": run.batch, "val_fraction": 0.1},
        "trainer": {"max_steps": run.steps, "accelerator": "cpu", "devices": 1, "logger": False,
                    "default_root_dir": str(folder / "run")},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(run: Run, folder: Path, timeout: float = 600) -> int:
    """Peak resident memory (``VmHWM``, bytes) of ``deltatune fit`` on ``run`` in a fresh process."""
    import os
    import subprocess
    import sys

    config = run_config(run, folder)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(config)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    found = [line for line in done.stdout.splitlines() if line.startswith("VmHWM ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"run '{run.name}' failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return int(found[-1].split()[1])


def validation_table(folder: Path) -> str:
    """Measure every run of :data:`VALIDATION_RUNS` and return a markdown table against the estimates."""
    import platform

    import torch

    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"runtime overhead in the estimate: {CPU_RUNTIME_BYTES / MIB:.0f} MiB.",
        "",
        "| run | estimated peak | measured peak (VmHWM) | error | of which activations | loading |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, run in enumerate(VALIDATION_RUNS):
        predicted = run.estimate()
        measured = measure(run, folder / f"run{index}")
        error = (predicted.peak - measured) / measured
        lines.append(f"| {run.name} | {predicted.peak / MIB:,.0f} MiB | {measured / MIB:,.0f} MiB | {error:+.1%} | "
                     f"{predicted.activations / MIB:,.0f} MiB | {predicted.loading / MIB:,.0f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.estimate_accuracy: measure this machine (docs/scale-out.md)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(validation_table(Path(tmp)))
