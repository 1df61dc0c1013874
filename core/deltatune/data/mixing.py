"""Several datasets in one run: weighted mixing of training rows, reproducible by seed.

``data.builder`` may be a list of :class:`DatasetSpec` (a builder reference plus a ``weight``)::

    builder:
      - {name: alpaca, config: {path: a.jsonl}, weight: 2}
      - {name: chat, config: {path: b.jsonl}, weight: 1}

Weights are relative: the training mix holds ``size * weight / sum(weights)`` rows of each dataset,
where ``size`` is ``mix_size`` or, by default, the total number of training rows. A dataset that
must give more rows than it has is repeated whole and topped up by a seeded sample, one that gives
fewer is sampled without replacement; the mix is then shuffled with the seed. Validation and test
splits are concatenated unweighted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import Field

from deltatune.plugin.resolve import PluginRef
from deltatune.plugin.protocols import Row


class DatasetSpec(PluginRef):
    """A dataset builder reference with its weight in a mix."""

    weight: float = Field(1.0, gt=0, description="relative share of the training mix")


def mix_counts(weights: Sequence[float], total: int) -> list[int]:
    """How many rows each dataset gives to a mix of ``total`` rows (largest remainders, sums to total)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def take(rows: Sequence[Row], count: int, rng: random.Random) -> list[Row]:
    """``count`` rows of ``rows``: whole repeats, then a sample without replacement for the rest."""
    repeats, rest = divmod(count, len(rows))
    return list(rows) * repeats + rng.sample(list(rows), rest)


def mix_rows(parts: Sequence[Sequence[Row]], weights: Sequence[float], seed: int, size: int | None = None) -> list[Row]:
    """The shuffled training mix of ``parts`` in proportion to ``weights`` (see the module doc)."""
    rng = random.Random(seed)
    counts = mix_counts(weights, size if size is not None else sum(len(p) for p in parts))
    mixed = [row for part, count in zip(parts, counts) for row in take(part, count, rng)]
    rng.shuffle(mixed)
    return mixed
