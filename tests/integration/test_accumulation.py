"""Token-count-exact gradient accumulation, alone and with DDP.

One optimizer step over the same eight rows (their answers of very different lengths, so their
micro-batches hold different numbers of labelled tokens) taken three ways: one process with one batch of
eight; one process with four accumulated micro-batches of two (``accumulate_grad_batches=4``); and two DDP
processes (CPU, gloo) each accumulating two micro-batches of two. The step's gradient must be the same
in all three (the mean over every labelled token of the eight rows) within 1e-6 in fp32, and the logged
training loss the same; a mean of per-micro-batch means, which the test computes too, is far off.

Run as a script (``python tests/integration/test_accumulation.py OUT DEVICES BATCH ACCUMULATE``), this
file is the training job itself: Lightning's DDP launcher starts the second process by running the same
command line again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS = 8
TIMEOUT = 300
ANSWERS = ["yes", "a b c d e f g h i j k l m n o p q r s t u v w x y z", "blue", "one two three four five six",
           "no", "the quick brown fox jumps over the lazy dog again and again", "ok", "red green"]


def write_data(path: Path) -> Path:
    """Alpaca rows whose answers have very different lengths (and two held out for validation)."""
    rows = [{"instruction": f"Answer question {i}.", "input": "", "output": answer}
            for i, answer in enumerate(ANSWERS + ["maybe", "later"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(out: Path, devices: int, batch_size: int, accumulate: int) -> None:
    """One optimizer step of a full fine-tune of the tiny model; rank 0 writes the gradients and losses."""
    from functools import partial

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from deltatune.data.module import InstructionDataModule, collate
    from deltatune.train.module import DeltaTuneModule

    class InOrder(InstructionDataModule):
        """Training rows in file order (DDP deals them round-robin to the ranks)."""

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.rows("train"), batch_size=self.batch_size, shuffle=False,
                              collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))

    L.seed_everything(0)
    module = DeltaTuneModule(base="tiny-llama", base_dtype="fp32", optimizer={"name": "adamw", "config": {"lr": 0.01}},
                             compare_base=False, samples=0, adapter_dir=str(out / "adapter"))
    data = InOrder(builder={"name": "alpaca", "config": {"path": str(write_data(out / "data.jsonl"))}},
                   base="tiny-llama", batch_size=batch_size, val_fraction=0.2, seed=0)
    micro_batches: list[list[int]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            micro_batches.append((batch["labels"][:, 1:] != -100).sum(1).tolist())

    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record()],
        default_root_dir=str(out),
    )
    trainer.fit(module, data)
    if trainer.is_global_zero:
        grads = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
        torch.save(grads, out / "grads.pt")
        result = {"world_size": trainer.world_size, "steps": trainer.global_step, "micro_batches": micro_batches,
                  "train_loss": float(trainer.callback_metrics["train_loss"]),
                  "rows": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.rows("train")]}
        (out / "result.json").write_text(json.dumps(result))


def run(out: Path, devices: int, batch_size: int, accumulate: int) -> tuple[dict, dict]:
    """Train in a fresh process (two for DDP); rank 0's result and gradients."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, str(out), str(devices), str(batch_size), str(accumulate)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "result.json").read_text()), torch.load(out / "grads.pt")


def largest_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


def gradient(rows: list[list[int]], micro_batch: int, token_mean: bool) -> dict:
    """In this process, on the tiny model: the gradient over ``rows`` (answers labelled, as the alpaca rows
    are) in micro-batches of ``micro_batch``: of the mean over every token (``token_mean``) or of the mean of
    the micro-batches' own token means (what per-micro-batch normalisation gave)."""
    import torch

    from deltatune.data.packing import collate
    from deltatune.model.loading import tiny_llama
    from deltatune.train.loss import token_loss

    model = tiny_llama().train()
    batches = [collate(rows[i:i + micro_batch], pad_id=0) for i in range(0, len(rows), micro_batch)]
    losses = [token_loss(model, batch, fast=False) for batch in batches]
    if token_mean:
        loss = sum(total for total, _ in losses) / sum(count for _, count in losses)
    else:
        loss = sum(total / count for total, count in losses) / len(losses)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_accumulated_and_ddp_steps_have_the_gradient_of_one_big_batch(tmp_path):
    big, big_grads = run(tmp_path / "big", devices=1, batch_size=ROWS, accumulate=1)
    accumulated, accumulated_grads = run(tmp_path / "accumulated", devices=1, batch_size=2, accumulate=4)
    ddp, ddp_grads = run(tmp_path / "ddp", devices=2, batch_size=2, accumulate=2)
    assert big["rows"] == accumulated["rows"] == ddp["rows"] and len(big["rows"]) == ROWS
    assert (big["world_size"], accumulated["world_size"], ddp["world_size"]) == (1, 1, 2)
    assert big["steps"] == accumulated["steps"] == ddp["steps"] == 1
    assert len(accumulated["micro_batches"]) == 4 and len(ddp["micro_batches"]) == 2
    tokens = [sum(m) for m in accumulated["micro_batches"]]
    assert max(tokens) > 2 * min(tokens), tokens  # micro-batches of very different token counts
    assert sum(tokens) == sum(big["micro_batches"][0])
    assert largest_relative_difference(accumulated_grads, big_grads) <= 1e-6
    assert largest_relative_difference(ddp_grads, big_grads) <= 1e-6
    # the gradient is the token mean of the eight rows (the model's own, plain loss); a mean of the
    # micro-batches' means is not
    assert largest_relative_difference(big_grads, gradient(big["rows"], 2, token_mean=True)) <= 1e-5
    assert largest_relative_difference(gradient(big["rows"], 2, token_mean=False), big_grads) > 1e-2
    for result in (accumulated, ddp):
        assert abs(result["train_loss"] - big["train_loss"]) <= 1e-6 * big["train_loss"]


if __name__ == "__main__":
    train(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
