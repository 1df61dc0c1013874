"""Handing freed heap memory back to the system between steps (core/deltatune/train/heap.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.train import heap, module
from deltatune.train.heap import free_heap_bytes

ROOT = Path(__file__).resolve().parents[3]

FRAGMENTED_HEAP = """
import os, torch
from deltatune.train.heap import release_freed_heap

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

torch.ones(4 * 2**20)  # a 16 MiB block, freed at once: glibc now serves blocks up to this size from its heap
blocks, pins = [], []
for _ in range(100):  # a step's activations, with something small and long-lived after each
    blocks.append(torch.ones(2**20))
    pins.append(torch.ones(16))
del blocks
freed = rss_mib()
assert not release_freed_heap(above=2**30)  # 400 MiB free: kept for the next step
assert rss_mib() >= freed - 10
assert release_freed_heap(above=2**28)
print(freed, rss_mib())
"""


@pytest.mark.skipif(free_heap_bytes() is None or not sys.platform.startswith("linux"), reason="needs glibc")
def test_the_heap_a_step_freed_goes_back_to_the_system():
    """400 MiB of freed 4 MiB blocks, pinned between live ones, stay resident until released, which
    happens only above the threshold."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    freed, released = map(float, out.stdout.split())
    assert freed - released >= 300, (freed, released)


def test_fit_offers_the_heap_back_after_every_micro_batch(tmp_path, monkeypatch):
    """A real Lightning run calls the release at the end of each of its micro-batches (the real one,
    counted; it trims only above its threshold)."""
    import lightning as L

    from deltatune.data.module import InstructionDataModule

    calls = []

    def counted(*args, **kwargs):
        calls.append(True)
        return heap.release_freed_heap(*args, **kwargs)

    monkeypatch.setattr(module, "release_freed_heap", counted)
    model = module.DeltaTuneModule(base="tiny-llama", delta=[{"name": "lora", "config": {"r": 2}}])
    data = InstructionDataModule(builder={"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"),
                                                                         "limit": 16}}, base="tiny-llama", batch_size=4)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert len(calls) == 4  # two steps of two micro-batches
