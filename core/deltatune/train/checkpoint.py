"""A ModelCheckpoint whose files appear atomically: written under a temporary name, then renamed."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from deltatune.errors import OutputError
from deltatune.io.atomic import recover, temp_path


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, but a crash mid-write never leaves a truncated ``.ckpt``.

    The file is written beside its target under :func:`deltatune.io.atomic.temp_path` (removed by the
    next write if its writer was killed) and renamed over it; a failed write (disk full) removes the
    temporary file and raises an :class:`~deltatune.errors.OutputError` — the previous checkpoint stays.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        recover(Path(filepath))
        tmp = temp_path(Path(filepath))
        try:
            super()._save_checkpoint(trainer, str(tmp))
            if trainer.is_global_zero:
                os.replace(tmp, filepath)
        except OSError as exc:
            raise OutputError(f"cannot write checkpoint {filepath}: {exc.strerror or exc}; "
                              "the previous checkpoint is intact") from exc
        finally:
            tmp.unlink(missing_ok=True)
        trainer.strategy.barrier("atomic-checkpoint")
        self._last_checkpoint_saved = filepath
