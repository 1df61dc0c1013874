"""Lightning callbacks that kill or crash a run mid-way, to test resuming (test_fit.py, test_resume.py)."""

from __future__ import annotations

import os

import lightning as L


class CrashAfterStep(L.Callback):
    """Exit the process abruptly (no clean-up, like a killed job) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            os._exit(3)


class Crash(RuntimeError):
    """Raised by :class:`RaiseAtStep`."""


class RaiseAtStep(L.Callback):
    """Crash the run in-process (an exception out of ``fit``) when training step ``step`` (1-based)
    starts: the checkpoints written before it stay, as after a kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step + 1 == self.step:
            raise Crash(f"crash at step {self.step}")
