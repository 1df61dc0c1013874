"""The progress bar of ``deltatune`` runs: Lightning's rich bar with a truthful epoch label."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar


class RunProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`, except for the label of a run
    bounded by ``max_steps``: Lightning then sets ``max_epochs`` to -1 and labels the bar
    ``Epoch 0/-2``; this bar says ``Epoch 0 · 200 steps`` (the run's step budget) instead; and the bar
    stops when training ends, before the run's report is printed."""

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Stop the bar when training ends, so its last state is drawn once, before the run's report
        (``on_fit_end``) and not again after it."""
        self._stop_progress()

    def _get_train_description(self, current_epoch: int) -> str:
        """The label of the training bar for ``current_epoch``."""
        epochs, steps = self.trainer.max_epochs, self.trainer.max_steps
        if epochs is None or epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}" + (f" · {steps} steps" if steps > 0 else "")
        return f"{description:{len(self.validation_description)}}"
