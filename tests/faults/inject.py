"""Faults injected into a real ``deltatune fit`` subprocess, as Lightning callbacks.

The fault tests add one with ``--trainer.callbacks+=inject.NAME`` (``tests/faults`` on ``PYTHONPATH``);
production code has no fault switch. Each fault strikes once at a chosen moment: ``SIGKILL`` or
``SIGINT`` sent to the process itself (a real signal, as from ``kill``), a write cut off half-way
before the kill, or the run's file system filled up (``ENOSPC`` from the kernel, on a small tmpfs).
"""

from __future__ import annotations

import errno
import io
import os
import signal
from pathlib import Path

import lightning as L
import torch


def kill(sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to this process (SIGKILL: no clean-up of any kind runs)."""
    os.kill(os.getpid(), sig)


class KillMidStep(L.Callback):
    """SIGKILL inside training step ``step`` (1-based), after its forward, before its backward."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            kill()


class InterruptAt(L.Callback):
    """SIGINT (Ctrl+C) when training step ``step`` (1-based) starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            kill(signal.SIGINT)


class KillDuringCheckpointWrite(L.Callback):
    """SIGKILL half-way through writing the checkpoint of step ``step``: half its bytes are on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        save = checkpoint_io.save_checkpoint

        def half_then_kill(checkpoint: dict, path: str, storage_options: object = None) -> None:
            if trainer.global_step < self.step:
                return save(checkpoint, path, storage_options)
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(path, "wb") as fh:
                fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            kill()

        checkpoint_io.save_checkpoint = half_then_kill


class KillDuringAdapterWrite(L.Callback):
    """SIGKILL half-way through writing ``adapter.safetensors`` at the end of the run."""

    def on_fit_end(self, trainer: L.Trainer, *args: object) -> None:
        from safetensors.torch import save

        from deltatune.io import adapter

        def half_then_kill(tensors: dict, filename: str, metadata: dict | None = None) -> None:
            data = save(tensors, metadata=metadata)
            with open(filename, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            kill()

        adapter.save_file = half_then_kill


def fill_disk(folder: Path) -> None:
    """Fill the file system holding ``folder`` (a small tmpfs) until the kernel says ENOSPC."""
    block = b"\0" * (1 << 16)
    with open(Path(folder) / "filler", "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


class FillDiskAt(L.Callback):
    """Fill the run folder's file system after training step ``step`` (before its checkpoint is
    written), or at the end of the run (before the adapter is written) when ``step`` is 0."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.step and trainer.global_step == self.step:
            fill_disk(Path(trainer.default_root_dir))

    def on_fit_end(self, trainer: L.Trainer, *args: object) -> None:
        if not self.step:
            fill_disk(Path(trainer.default_root_dir))
