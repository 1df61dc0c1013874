"""How well ``deltatune estimate`` predicts: short real ``deltatune fit`` runs of SmolLM2-135M, and of
a random-weight mixture of experts (:func:`random_mixtral`), each in a fresh process whose peak resident
memory (``VmHWM``) is read back, against the estimate.

``python -m benchmarks.estimate_accuracy`` prints the table of ``docs/scale-out.md`` for this machine
(``--moe``: the mixture-of-experts table of ``docs/families.md``); ``tests/unit/estimate/test_estimate.py``
runs some of the same :data:`VALIDATION_RUNS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.estimate.memory import CPU_RUNTIME_BYTES, MIB, Estimate, estimate


@dataclass(frozen=True)
class Run:
    """A short ``deltatune fit`` whose peak resident memory is measured in a fresh process."""

    name: str
    base: str | Callable[[Path], str]
    """A base as ``fit`` takes it, or a function writing one into a folder and returning its path."""
    delta: tuple[dict[str, Any], ...] = ({"name": "lora", "config": {"r": 8, "targets": "all-linear"}},)
    quantizer: dict[str, Any] | None = None
    batch: int = 4
    seq: int = 128
    steps: int = 2
    base_dtype: str = "auto"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "config": {"lr": 1e-3}})

    def base_in(self, folder: Path) -> str:
        """The base of this run (written under ``folder`` when :attr:`base` makes one)."""
        return self.base if isinstance(self.base, str) else self.base(folder / "base")

    def estimate(self, base: str | None = None) -> Estimate:
        """The estimate of this run on this machine's CPU (``base``: :meth:`base_in`'s answer)."""
        # the text builder labels every token of a row but the first (next-token prediction)
        return estimate(base or self.base, list(self.delta), self.quantizer, self.optimizer, self.batch, self.seq, 1,
                        "cpu", base_dtype=self.base_dtype, labelled=(self.seq - 1) / self.seq)


_LORA16 = ({"name": "lora", "config": {"r": 16, "targets": "all-linear"}},)
VALIDATION_RUNS = (
    Run("LoRA r=16 all-linear, bf16 base, AdamW, 4 x 256", "smollm2-135m-instruct", delta=_LORA16, seq=256,
        base_dtype="bf16"),
    Run("QLoRA: NF4-DQ + LoRA r=16 all-linear, AdamW, 4 x 256", "smollm2-135m-instruct", delta=_LORA16,
        quantizer={"name": "nf4", "config": {"compute_dtype": "bf16"}}, seq=256, base_dtype="bf16"),
    Run("full fine-tune, fp32, AdamW, 2 x 128", "smollm2-135m-instruct", delta=(), batch=2),
    Run("full fine-tune, fp32, LOMO, 2 x 128", "smollm2-135m-instruct", delta=(), batch=2,
        optimizer={"name": "lomo", "config": {"lr": 1e-2}}),
)
"""SmolLM2-135M runs whose measured peaks ``tests/unit/estimate/test_estimate.py`` and ``docs/scale-out.md`` compare
the estimator with (``python -m benchmarks.estimate_accuracy`` prints the table). The LoRA and QLoRA runs
compute in bf16 on every CPU (emulated where the CPU has no bf16 products), so they measure the same
thing wherever they run; ``auto`` would pick fp32 on such a CPU."""



def random_mixtral(folder: Path) -> str:
    """A seeded random-weight Mixtral (8 experts, 2 per token, 4 layers, hidden 512; half of its
    parameters in the experts) with SmolLM2's tokenizer, saved in ``folder`` (once)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from deltatune.model.loading import load_tokenizer

    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                               num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=False,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            MixtralForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


_EXPERTS16 = ({"name": "lora", "config": {"r": 16, "targets": "all-linear", "target_parameters": "all-experts"}},)
MOE_RUNS = (
    Run("Mixtral: LoRA r=16 all-linear + all experts, bf16 base, AdamW, 4 x 256", random_mixtral,
        delta=_EXPERTS16, seq=256),
    Run("Mixtral: NF4 (experts too) + LoRA r=16 all-linear + all experts, AdamW, 4 x 256", random_mixtral,
        delta=_EXPERTS16, quantizer={"name": "nf4"}, seq=256),
    Run("Mixtral: LoRA r=16 all-linear (attention only), bf16 base, AdamW, 4 x 256", random_mixtral,
        delta=_LORA16, seq=256),
)
"""Runs of a random-weight mixture of experts (:func:`random_mixtral`): its measured peaks against the
estimator, in ``docs/families.md`` (``python -m benchmarks.estimate_accuracy --moe``)."""

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


def run_config(run: Run, folder: Path, base: str | None = None) -> Path:
    """Write the data and the YAML of ``run`` under ``folder``; return the YAML."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.txt"
    rows = run.batch * (run.steps + 2)  # every row exactly seq tokens (byte-level: more words than needed)
    data.write_text(_text(rows * run.seq))
    config = {
        "seed_everything": 0,
        "model": {"base": base or run.base, "base_dtype": run.base_dtype, "delta": list(run.delta),
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


def measure(run: Run, folder: Path, timeout: float = 600, base: str | None = None) -> int:
    """Peak resident memory (``VmHWM``, bytes) of ``deltatune fit`` on ``run`` in a fresh process
    (``base``: where :meth:`Run.base_in` wrote the run's base, when it makes one)."""
    import os
    import subprocess
    import sys

    config = run_config(run, folder, base)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(config)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    found = [line for line in done.stdout.splitlines() if line.startswith("VmHWM ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"run '{run.name}' failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return int(found[-1].split()[1])


def validation_table(folder: Path, runs: tuple[Run, ...] = VALIDATION_RUNS) -> str:
    """Measure every run of ``runs`` and return a markdown table against the estimates."""
    import platform

    import torch

    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"runtime overhead in the estimate: {CPU_RUNTIME_BYTES / MIB:.0f} MiB.",
        "",
        "| run | estimated peak | measured peak (VmHWM) | error | of which activations | loading |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, run in enumerate(runs):
        base = run.base_in(folder)
        predicted = run.estimate(base)
        measured = measure(run, folder / f"run{index}", base=base)
        error = (predicted.peak - measured) / measured
        lines.append(f"| {run.name} | {predicted.peak / MIB:,.0f} MiB | {measured / MIB:,.0f} MiB | {error:+.1%} | "
                     f"{predicted.activations / MIB:,.0f} MiB | {predicted.loading / MIB:,.0f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.estimate_accuracy [--moe]: measure this machine
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(validation_table(Path(tmp), MOE_RUNS if "--moe" in sys.argv[1:] else VALIDATION_RUNS))
