"""Instruction data: encoding prompt/response pairs, batching, and the Lightning data module.

Builders (plugins) turn files into rows with :func:`encode_example`; the core collates rows into
padded batches (labels ``-100`` on padding and, by default, on the prompt), holds out a validation
split when a builder has none, and reports truncation the same way for every builder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from .config import PluginRef, ResolvedPlugin, coerce_ref, resolve
from .errors import DataError
from .models import DEFAULT_MODEL, load_tokenizer
from .protocols import Row

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")


@dataclass
class TruncationStats:
    """How many examples lost prompt or response tokens to ``max_length``, or were dropped."""

    examples: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    dropped: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the run log."""
        return (
            f"{self.examples} examples: {self.prompts_cut} prompts and {self.responses_cut} responses "
            f"truncated, {self.dropped} dropped (no response token fits)"
        )


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    train_on_prompt: bool = False,
    stats: TruncationStats | None = None,
    line: int | None = None,
) -> Row | None:
    """Tokenise ``prompt`` + ``response`` + EOS into a training row.

    The loss covers the response (and EOS) only, unless ``train_on_prompt``. When the pair exceeds
    ``max_length``, the prompt loses tokens from its start first (keeping at least half the budget),
    then the response from its end. A row whose response would vanish entirely is dropped
    (``None``) and counted in ``stats`` — never silently.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if stats is not None:
        stats.examples += 1
    if len(prompt_ids) + len(response_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
        if keep_prompt < len(prompt_ids):
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
            if stats is not None:
                stats.prompts_cut += 1
        room = max_length - len(prompt_ids)
        if room <= 0:
            if stats is not None:
                stats.dropped += 1
                if line is not None:
                    stats.dropped_lines.append(line)
            return None
        if room < len(response_ids):
            response_ids = response_ids[:room]
            if stats is not None:
                stats.responses_cut += 1
    labels = (prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
    return {"input_ids": prompt_ids + response_ids, "labels": labels, "prompt": prompt, "response": response}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; a malformed line is a :class:`DataError`
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a ``.jsonl`` file, or of a ``.json`` file holding a list of objects."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    for index, value in enumerate(data):
        if not isinstance(value, dict):
            raise DataError(f"{path}: item {index} is a {type(value).__name__}, expected an object")
        yield index, value


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


def split_off(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministically hold out ``fraction`` of ``rows``: ``(kept, held_out)``."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(rows) * fraction)) if fraction > 0 and len(rows) > 1 else 0
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


class InstructionDataModule(L.LightningDataModule):
    """Rows from a dataset-builder plugin, batched for training and evaluation."""

    def __init__(
        self,
        builder: PluginRef | str = "alpaca",
        base: str = DEFAULT_MODEL,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        """``builder`` is validated at once (before any model is loaded); ``base`` gives the tokenizer."""
        super().__init__()
        self.builder: ResolvedPlugin = resolve("dataset_builder", coerce_ref(builder))
        self.base = base
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.trust_remote_code = trust_remote_code
        self.tokenizer: Any = None
        self.splits: dict[str, list[Row]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and build every split once."""
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.base, self.trust_remote_code)
        built = {split: self.builder.plugin.build(self.builder.cfg, self.tokenizer, split) for split in SPLITS}
        train = built["train"] or []
        if not train:
            raise DataError(f"dataset builder '{self.builder.name}' produced no training rows")
        if built["validation"] is None:
            train, built["validation"] = split_off(train, self.val_fraction, self.seed)
        self.splits = {"train": train, "validation": built["validation"] or [], "test": built["test"] or []}

    def rows(self, split: str) -> list[Row]:
        """The tokenised rows of ``split`` (after :meth:`setup`)."""
        return self.splits.get(split, [])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        size = self.batch_size if split == "train" else self.eval_batch_size
        pad_id = self.tokenizer.pad_token_id
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.rows(split),
            batch_size=size,
            shuffle=shuffle,
            collate_fn=lambda rows: collate(rows, pad_id),
            num_workers=self.num_workers,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order (falls back to validation when there is no test split)."""
        return self._loader("test" if self.rows("test") else "validation", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()
