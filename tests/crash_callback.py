"""A Lightning callback that kills the process mid-run, to test resuming (used by test_fit.py)."""

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
