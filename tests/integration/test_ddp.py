"""Scale-out on Lightning's own strategies: 2-process DDP on the CPU (gloo) against one process.

Global batch 8 as 2 processes x 4 rows (``strategy="ddp"``) and as 1 process x 8 rows, same seed,
same data order: the LoRA weights after a few AdamW steps and the validation loss must agree within
float tolerance, for LoRA on an fp32 base and for QLoRA (NF4 base + LoRA). A third test runs
``deltatune fit`` with ``trainer.strategy: ddp`` from a YAML file, as a user would. FSDP is checked to
fail on the CPU with Lightning's own clear message (it needs GPUs; see docs/scale-out.md).

*Same data order*: the training loader shuffles with a seeded ``RandomSampler``; Lightning turns it
into a ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``, whose permutation for
``seed_everything(0)`` is the same ``randperm(n, seed 0)``, dealt round-robin to the ranks, so every
global batch holds the same rows in both runs. (deltatune's own data module passes its generator to
the ``DataLoader``, which draws a worker seed from it before sampling, so its single-process order
differs from the DDP order; runs are still deterministic, just not comparable batch for batch. This
file therefore uses its own loader, below.)

Run as a script (``python tests/integration/test_ddp.py OUT DEVICES [nf4]``), this file is the training job
itself: Lightning's DDP launcher starts the second process by running the same command line again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8
STEPS = 6
TIMEOUT = 240


def train(out: Path, devices: int, quantize: bool) -> None:
    """One fit on the tiny model; writes ``out/result.json`` (rank 0) and the adapter."""
    from functools import partial

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from deltatune.data.module import InstructionDataModule, collate
    from deltatune.train.module import DeltaTuneModule

    class SeededShuffle(InstructionDataModule):
        """Training batches from a seeded ``RandomSampler`` (see the module docstring)."""

        def train_dataloader(self) -> DataLoader:
            rows = self.rows("train")
            sampler = RandomSampler(rows, generator=torch.Generator().manual_seed(0))
            return DataLoader(rows, batch_size=self.batch_size, sampler=sampler,
                              collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))

    L.seed_everything(0)
    module = DeltaTuneModule(
        base="tiny-llama", base_dtype="fp32",
        quantizer={"name": "nf4", "config": {"compute_dtype": "fp32"}} if quantize else None,
        delta=[{"name": "lora", "config": {"r": 8, "alpha": 16, "targets": "all-linear"}}],
        optimizer={"name": "adamw", "config": {"lr": 0.01, "warmup_steps": 2}},
        evaluators=["perplexity"], compare_base=False, samples=0, adapter_dir=str(out / "adapter"),
    )
    data = SeededShuffle(
        builder={"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"),
                                              "limit": 64, "max_length": 96}},
        base="tiny-llama", batch_size=GLOBAL_BATCH // devices, val_fraction=0.25,
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train_loss"]))

    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(out), callbacks=[Record()],
    )
    trainer.fit(module, data)
    val = trainer.validate(module, data, verbose=False)[0]["val_loss"]
    if trainer.is_global_zero:
        result = {"world_size": trainer.world_size, "train_loss": losses, "val_loss": val,
                  "steps": trainer.global_step}
        (out / "result.json").write_text(json.dumps(result))


def run(out: Path, devices: int, quantize: bool = False) -> dict:
    """Train in a fresh process (``devices`` processes for DDP); the result of rank 0."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, str(out), str(devices), *(["nf4"] if quantize else [])]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def compare(single_dir: Path, ddp_dir: Path) -> tuple[float, float]:
    """``(largest relative difference of a LoRA tensor, of one tensor's max abs difference)``."""
    from safetensors.torch import load_file

    one = load_file(str(single_dir / "adapter" / "adapter.safetensors"))
    two = load_file(str(ddp_dir / "adapter" / "adapter.safetensors"))
    assert one.keys() == two.keys() and len(one) == 28  # 14 linear layers x (A, B)
    relative = max(float((one[k] - two[k]).norm() / one[k].norm()) for k in one)
    absolute = max(float((one[k] - two[k]).abs().max()) for k in one)
    return relative, absolute


def check(tmp_path: Path, quantize: bool, tolerance: float) -> None:
    single = run(tmp_path / "single", 1, quantize)
    ddp = run(tmp_path / "ddp", 2, quantize)
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert single["steps"] == ddp["steps"] == STEPS
    # the logged training loss is the global token mean in both runs
    for a, b in zip(single["train_loss"], ddp["train_loss"], strict=True):
        assert abs(a - b) <= tolerance * abs(a), (single["train_loss"], ddp["train_loss"])
    assert single["train_loss"][-1] < single["train_loss"][0]
    assert abs(single["val_loss"] - ddp["val_loss"]) <= tolerance * single["val_loss"]
    relative, _ = compare(tmp_path / "single", tmp_path / "ddp")
    assert relative <= tolerance * 10, f"LoRA weights differ by {relative:.2e} (relative)"
    print(f"single vs ddp: train losses {single['train_loss']} vs {ddp['train_loss']}, "
          f"val {single['val_loss']:.6f} vs {ddp['val_loss']:.6f}, weights {relative:.2e}")


def test_lora_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    check(tmp_path, quantize=False, tolerance=1e-5)


def test_qlora_nf4_base_under_ddp_matches_one_process(tmp_path):
    check(tmp_path, quantize=True, tolerance=1e-5)


def test_cli_fit_with_strategy_ddp_from_yaml(tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(f"""\
seed_everything: 0
model:
  base: tiny-llama
  quantizer: {{name: nf4}}
  delta: [{{name: lora, config: {{r: 4, targets: all-linear}}}}]
  optimizer: {{name: adamw, config: {{lr: 0.01}}}}
  compare_base: false
  samples: 0
data:
  builder: {{name: alpaca, config: {{path: {ROOT / 'examples/data/tasks-train.jsonl'}, limit: 32, max_length: 64}}}}
  batch_size: 4
  val_fraction: 0.25
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
  max_steps: 3
  logger: false
  default_root_dir: {tmp_path / 'run'}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "deltatune.cli.main", "fit", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 3
    manifest = json.loads((tmp_path / "run" / "adapter" / "deltatune.json").read_text())
    assert manifest["quantizer"]["name"] == "nf4" and manifest["delta"][0]["name"] == "lora"
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr


def test_fsdp_on_the_cpu_is_a_clear_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "deltatune.cli.main", "fit", "--config", str(ROOT / "tests/configs/tiny-lora.yaml"),
               "--trainer.strategy=fsdp", "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "strategy 'fsdp' (FSDP) needs CUDA GPUs" in output and "`trainer.strategy: ddp`" in output
    assert "docs/scale-out.md" in output
    assert not (tmp_path / "adapter").exists()
    # Lightning itself agrees: its FSDP strategy refuses the CPU
    import lightning as L
    import pytest

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


if __name__ == "__main__":
    train(Path(sys.argv[1]), int(sys.argv[2]), quantize="nf4" in sys.argv[3:])
