"""Where the real tokens of a batch are: the unpadded layout a fast training forward computes on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltatune.api import IGNORE_INDEX, SHAPE_STEPS, round_up

@dataclass
class TokenLayout:
    """Where the real tokens of a batch are, and how they form examples.

    ``index`` holds, for each of the ``T`` computed tokens, its position in the flattened
    ``(batch x length)`` input; ``positions`` its rotary position. Attention runs in a padded
    ``(examples x width)`` layout in which real token ``t`` sits at ``slots[t]``.

    ``T`` and ``width`` are rounded up to the steps of :data:`SHAPE_STEPS`: the first ``real``
    tokens are the batch's, the rest are filler rows (the batch's first token again, at position 0,
    with no target and outside every attention example). A filler row reaches neither the loss nor a real row, so its
    gradient is exactly zero and it changes no result; what it buys is a small set of matrix shapes.
    oneDNN builds and caches a kernel ("primitive") per shape, and with the exact token count nearly
    every step brought new shapes: slower steps while they are built, and memory that grew with the
    cache (measured in docs/benchmarks.md).
    """

    index: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    examples: int
    width: int
    targets: torch.Tensor
    """Next-token target of each computed token (-100: none)."""
    count: int
    """Labelled targets (equal to the plain path's count)."""
    real: int
    """How many of the computed tokens are the batch's (the rest are filler rows)."""

    @staticmethod
    def build(batch: dict[str, torch.Tensor]) -> TokenLayout | None:
        """The layout of ``batch``, or ``None`` when a labelled target follows a padding position
        (the plain path would read a padding position's output there)."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows, length = input_ids.shape
        device = input_ids.device
        targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1).reshape(-1)
        mask = batch.get("attention_mask")
        if mask is None:
            index = torch.arange(rows * length, device=device)
        else:
            index = mask.reshape(-1).nonzero().squeeze(1)
        flat_targets = targets[index]
        labelled = flat_targets != IGNORE_INDEX
        count = int(labelled.sum())
        if count != int((labels[:, 1:] != IGNORE_INDEX).sum()):
            return None
        position_ids = batch.get("position_ids")
        if position_ids is None:
            positions = index % length
        else:
            positions = position_ids.expand(rows, length).reshape(-1)[index]
        row = torch.div(index, length, rounding_mode="floor")
        starts = torch.ones_like(index, dtype=torch.bool)
        starts[1:] = (row[1:] != row[:-1]) | (positions[1:] != positions[:-1] + 1)
        segment = starts.cumsum(0) - 1
        # only examples with a labelled target are computed: attention never crosses examples
        wanted = torch.zeros(int(segment[-1]) + 1 if len(segment) else 0, dtype=torch.bool, device=device)
        wanted[segment[labelled]] = True
        keep = wanted[segment]
        if not bool(keep.all()):
            index, positions, starts, flat_targets = index[keep], positions[keep], starts[keep], flat_targets[keep]
            segment = starts.cumsum(0) - 1
        lengths = torch.bincount(segment) if len(segment) else segment
        real, (tokens_step, width_step) = len(index), SHAPE_STEPS
        examples = len(lengths)
        width = round_up(int(lengths.max()), width_step) if len(lengths) else 0
        first = torch.cumsum(lengths, 0) - lengths
        offset = torch.arange(real, device=device) - first[segment]
        filler = round_up(real, tokens_step) - real if real else 0
        return TokenLayout(index=F.pad(index, (0, filler)), positions=F.pad(positions, (0, filler)),
                           slots=segment * width + offset, examples=examples, width=width,
                           targets=F.pad(flat_targets, (0, filler), value=IGNORE_INDEX), count=count, real=real)

    def to_examples(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, C)`` token rows → ``(examples * width, C)`` (zeros where an example is shorter; filler
        rows are left out)."""
        out = x.new_zeros((self.examples * self.width, x.shape[1]))
        return out.index_copy_(0, self.slots, x[: self.real])

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(examples * width, C)`` → ``(T, C)`` (zeros in the filler rows)."""
        out = x.new_zeros((len(self.index), x.shape[1]))
        torch.index_select(x, 0, self.slots, out=out[: self.real])
        return out
