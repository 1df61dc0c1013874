"""The contract of dataset builders: :class:`DatasetBuilderContract`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from deltatune.errors import DataError
from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.testing.contract import PluginContract
from deltatune.testing.helpers import training_loss


class DatasetBuilderContract(PluginContract):
    """The contract of a dataset builder (:class:`deltatune.plugin.protocols.DatasetBuilder`).

    The subclass gives :attr:`records` (valid examples) and :attr:`malformed` (each one bad example),
    and overrides :meth:`write` / :meth:`make_config` when its files are not JSONL with a ``path``
    option. Checked:

    * ``build(cfg, tokenizer, "train")`` gives one row per record (when :attr:`one_row_per_record`;
      else at least one row), each with ``input_ids`` and ``labels`` of equal length, every label
      ``-100`` or the token at its position;
    * when :attr:`masks_prompt`, the prompt is masked: the first label is ``-100``, and the labelled
      tokens spell the row's ``response``; when also :attr:`prompt_fully_masked`, every token of the
      row's ``prompt`` is masked. A builder for continued pre-training (``masks_prompt = False``)
      must label every token instead;
    * a file with a malformed record raises :class:`deltatune.errors.DataError` naming the file and
      the line (:meth:`bad_line`);
    * a split with no data is ``None``;
    * the rows go through the core's collator into a finite loss of the tiny model.
    """

    kind: ClassVar[str] = "dataset_builder"
    builder_name: ClassVar[str] = ""
    records: ClassVar[list[Any]] = []
    malformed: ClassVar[list[Any]] = []
    suffix: ClassVar[str] = ".jsonl"
    one_row_per_record: ClassVar[bool] = True
    masks_prompt: ClassVar[bool] = True
    prompt_fully_masked: ClassVar[bool] = True

    def write(self, path: Path, records: list[Any]) -> None:
        """Write ``records`` to ``path`` (JSONL; a string record is written as the raw line)."""
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def make_config(self, path: Path) -> dict[str, Any]:
        """The builder's options for a training file ``path``."""
        return {**self.config, "path": str(path)}

    def options(self) -> dict[str, Any]:
        """Options for a (not yet written) training file."""
        return self.make_config(Path(f"data{self.suffix}"))

    def bad_line(self, path: Path, index: int) -> int:
        """The line (1-based) the error must name for a malformed record after ``index`` good ones."""
        return index + 1

    def build(self, manager: PluginManager, tmp_path: Path, records: list[Any], split: str = "train") -> Any:
        """Write ``records`` and build ``split``; returns ``(rows, path)``."""
        assert self.records, f"{type(self).__name__} must set `records` (valid examples)"
        path = tmp_path / f"data{self.suffix}"
        self.write(path, records)
        plugin = self.resolved(manager, self.make_config(path))
        return plugin.plugin.build(plugin.cfg, self.tokenizer(), split), path

    def test_rows_are_tokenised_with_aligned_labels(self, manager: PluginManager, tmp_path: Path) -> None:
        """One row per record; ``input_ids``/``labels`` of equal length; labels are -100 or the token."""
        rows, _ = self.build(manager, tmp_path, list(self.records))
        assert isinstance(rows, list) and rows, "no rows"
        if self.one_row_per_record:
            assert len(rows) == len(self.records), f"{len(rows)} rows from {len(self.records)} records"
        for row in rows:
            ids, labels = row["input_ids"], row["labels"]
            assert len(ids) == len(labels) > 0
            assert all(isinstance(t, int) for t in ids) and all(isinstance(t, int) for t in labels)
            assert all(label in (-100, token) for label, token in zip(labels, ids)), "a label is neither -100 nor its token"
            assert any(label != -100 for label in labels), "a row has no labelled token"

    def test_labels_mask_the_prompt_or_cover_every_token(self, manager: PluginManager, tmp_path: Path) -> None:
        """The loss covers the response, not the prompt (or, without :attr:`masks_prompt`, every token)."""
        tokenizer = self.tokenizer()
        rows, _ = self.build(manager, tmp_path, list(self.records))
        for row in rows:
            labels = row["labels"]
            if not self.masks_prompt:
                assert labels == row["input_ids"], "a pre-training builder must label every token"
                continue
            assert labels[0] == -100, "the first token (prompt) carries a label"
            labelled = [t for t in labels if t != -100]
            if row.get("response"):
                text = tokenizer.decode(labelled, skip_special_tokens=True)
                assert row["response"].strip() in text, f"labelled text {text!r} lacks the response {row['response']!r}"
            if self.prompt_fully_masked and row.get("prompt"):
                count = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
                if row["input_ids"][:count] == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]:
                    assert all(t == -100 for t in labels[:count]), "a prompt token carries a label"

    def test_malformed_records_are_reported_with_file_and_line(self, manager: PluginManager, tmp_path: Path) -> None:
        """Each malformed record raises :class:`DataError` naming the file and the line."""
        assert self.malformed, f"{type(self).__name__} must set `malformed` (bad examples)"
        for number, bad in enumerate(self.malformed):
            folder = tmp_path / f"bad{number}"
            folder.mkdir()
            with pytest.raises(DataError) as error:
                self.build(manager, folder, [*self.records, bad])
            path = folder / f"data{self.suffix}"
            line = self.bad_line(path, len(self.records))
            message = str(error.value)
            assert path.name in message, f"the error does not name the file: {message}"
            assert re.search(rf"(?<!\d){line}(?!\d)", message), f"the error does not name line {line}: {message}"

    def test_missing_split_is_none(self, manager: PluginManager, tmp_path: Path) -> None:
        """A split the configuration gives no data for is ``None`` (the core then holds out rows)."""
        rows, _ = self.build(manager, tmp_path, list(self.records), split="test")
        assert rows is None

    def test_rows_collate_into_a_finite_loss(self, manager: PluginManager, tmp_path: Path) -> None:
        """The core's collator batches the rows and the tiny model computes a finite loss on them."""
        from deltatune.data.module import collate

        rows, _ = self.build(manager, tmp_path, list(self.records))
        tokenizer = self.tokenizer()
        batch = collate(rows, tokenizer.pad_token_id)
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        model = models.load_model(self.base, torch.float32)
        assert torch.isfinite(training_loss(model, batch))
