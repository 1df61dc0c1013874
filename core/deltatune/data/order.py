"""Training order: a function of (seed, epoch), resumable from the middle of an epoch.

An :class:`EpochOrder` is a sampler (of row indices, or of whole batches) whose order for an epoch
depends on its seed and that epoch only — so a run resumed at epoch 3 sees epoch 3's order, not epoch
0's again. :class:`ResumableLoader` is a ``DataLoader`` over one that Lightning treats as stateful:
every checkpoint stores its :meth:`~ResumableLoader.state_dict` (the epoch and how many batches of it
were served) and a resumed run gives it back through :meth:`~ResumableLoader.load_state_dict`, so the
resumed epoch continues with the next batch the interrupted run would have trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler


class EpochOrder(Sampler):
    """A sampler whose order is :meth:`order` ``(epoch)``; Lightning calls :meth:`set_epoch`.

    ``per_batch`` items of the order make one batch (the batch size for a sampler of row indices, 1 for
    a sampler of batches); :meth:`resume` makes the next iteration of an epoch skip the batches a
    checkpoint had already served.
    """

    per_batch = 1

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def order(self, epoch: int) -> list[Any]:
        """Every item of ``epoch``, in order (deterministic for a seed and epoch)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields."""
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Make the next iteration yield ``epoch`` from its batch number ``batches`` on."""
        self.epoch = epoch
        self._skip = (epoch, batches)

    def skipped_batches(self) -> int:
        """How many batches of the current epoch the next iteration skips."""
        return self._skip[1] if self._skip and self._skip[0] == self.epoch else 0

    def __iter__(self) -> Iterator[Any]:
        start = self.skipped_batches() * self.per_batch
        self._skip = None
        return iter(self.order(self.epoch)[start:])


class ShuffledRows(EpochOrder):
    """Row indices ``0..size-1`` shuffled afresh for every epoch; batches of ``batch_size`` rows."""

    def __init__(self, size: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.size = size
        self.per_batch = batch_size

    def order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def batches(self, epoch: int) -> list[list[int]]:
        """The row indices of each batch of ``epoch``."""
        order = self.order(epoch)
        return [order[i:i + self.per_batch] for i in range(0, len(order), self.per_batch)]

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochOrder` (as ``sampler`` or ``batch_sampler``) whose position
    inside an epoch is saved in checkpoints (Lightning's stateful-loader protocol).

    Where Lightning swapped the sampler for a distributed one (several processes), the position is not
    tracked (an empty state): a resumed epoch then starts from its beginning, as Lightning does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        candidates = (self.batch_sampler, self.sampler)
        self.order: EpochOrder | None = next((s for s in candidates if isinstance(s, EpochOrder)), None)
        self._served = 0

    def __iter__(self) -> Iterator[Any]:
        self._served = self.order.skipped_batches() if self.order is not None else 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches were served (an epoch served whole: the next one)."""
        if self.order is None:
            return {}
        if self._served >= len(self):
            return {"epoch": self.order.epoch + 1, "batches": 0}
        return {"epoch": self.order.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration starts at its batch."""
        if self.order is not None and state:
            self.order.resume(state["epoch"], state["batches"])
