"""A ModelCheckpoint whose files appear atomically: written under a temporary name, then renamed."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, but a crash mid-write never leaves a truncated ``.ckpt``."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.partial"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("atomic-checkpoint")
        self._last_checkpoint_saved = filepath
