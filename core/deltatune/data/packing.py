"""Batch shaping: sequence packing, length-grouped batches, and how much of a batch is padding.

Packing puts several examples into one row of at most ``pack_length`` tokens. Nothing may leak
between them: each example's ``position_ids`` restart at 0, and the attention of every token is
restricted to its own example. The packed batch has *no* ``attention_mask``; Hugging Face
``transformers`` (5.x) then reads the example boundaries from the restarting ``position_ids``
(``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask for the
sdpa, eager and flex attention kernels. The first label of every example is ignored, as it is when the
example stands alone (nothing precedes it to predict it from), so the loss of each example is the
same packed and unpacked — ``tests/unit/data/test_packing.py`` checks it to 1e-5, and :func:`deltatune.train.packing_check.packing_problem`
lets a run check it on its own model before training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from deltatune.data.order import EpochOrder
from deltatune.plugin.protocols import Row

IGNORE_INDEX = -100


def pack_rows(rows: Sequence[Row], pack_length: int) -> list[Row]:
    """Pack ``rows`` (in the given order) first-fit into rows of at most ``pack_length`` tokens.

    A packed row has ``input_ids``, ``labels`` (the first label of every example set to -100),
    ``position_ids`` (restarting at 0 per example) and ``lengths`` (of its examples). A row longer
    than ``pack_length`` stays alone in its own packed row.
    """
    bins: list[list[Row]] = []
    room: list[int] = []
    for row in rows:
        n = len(row["input_ids"])
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([row])
            room.append(pack_length - n)
        else:
            bins[slot].append(row)
            room[slot] -= n
    return [_join(b) for b in bins]


def _join(rows: list[Row]) -> Row:
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        n = len(row["input_ids"])
        input_ids += row["input_ids"]
        labels += [IGNORE_INDEX, *row["labels"][1:]]
        positions += range(n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
            "lengths": [len(r["input_ids"]) for r in rows]}


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def collate_packed(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows: ``input_ids``, ``labels`` and ``position_ids``, and no attention mask.

    The padding of a row is a segment of its own (positions restart at 0, labels -100), so no real
    token attends to it.
    """
    batch = collate(rows, pad_id)
    del batch["attention_mask"]
    length = batch["input_ids"].shape[1]
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        positions[i, :n] = torch.tensor(row["position_ids"])
        positions[i, n:] = torch.arange(length - n)
    batch["position_ids"] = positions
    return batch


class LengthGroupedBatches(EpochOrder):
    """Batches of indices whose rows have similar lengths, in a seeded random order.

    Each epoch shuffles the indices, cuts them into groups of ``batch_size * group_batches``, sorts each
    group by length and cuts it into batches, then shuffles the batches — padding shrinks while the
    order stays random (the scheme of Hugging Face's ``LengthGroupedSampler``). The order is a function
    of the seed and the epoch (:class:`~deltatune.data.order.EpochOrder`).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50) -> None:
        """``lengths[i]`` is the token count of row ``i``."""
        super().__init__(seed)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = batch_size * group_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (deterministic for a seed and epoch)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.group):
            group = sorted(order[start:start + self.group], key=lambda i: -self.lengths[i])
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        rng.shuffle(batches)
        return batches

    order = batches

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The fraction of token slots that are padding when rows of ``lengths`` are batched as ``batches``
    (lists of row indices), each batch padded to its longest row."""
    slots = tokens = 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        if sizes:
            slots += max(sizes) * len(sizes)
            tokens += sum(sizes)
    return 1.0 - tokens / slots if slots else 0.0


def describe_batches(rows: Sequence[Row], batches: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Token counts of a batch plan: ``rows``, ``batches``, ``tokens``, ``padding`` (fraction)."""
    lengths = [len(r["input_ids"]) for r in rows]
    return {"rows": len(rows), "batches": len(batches), "tokens": sum(lengths),
            "padding": padding_fraction(lengths, batches)}
