"""text: documents concatenated with EOS and cut into full-loss rows of max_length tokens."""

from __future__ import annotations

import json

import pytest

from deltatune.api import DataError
from deltatune.plugin.resolve import resolve
from deltatune.data.module import collate
from deltatune.train.loss import token_loss
from deltatune.model.loading import tiny_llama, tiny_tokenizer


def build(path, split="train", **config):
    builder = resolve("dataset_builder", {"name": "text", "config": {"path": str(path), **config}})
    return builder.plugin.build(builder.cfg, tiny_tokenizer(), split)


def test_documents_are_concatenated_with_eos_and_chunked(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first paragraph\n\nsecond one\n\n\nthird")
    eos = tiny_tokenizer().eos_token_id
    whole = build(path, max_length=16)
    assert sum(len(r["input_ids"]) for r in whole) == len(path.read_text().encode()) + 1
    assert all(len(r["input_ids"]) == 16 for r in whole[:-1]) and all(r["labels"] == r["input_ids"] for r in whole)
    paragraphs = build(path, max_length=1000, paragraphs=True)
    (row,) = paragraphs
    assert row["input_ids"].count(eos) == 3
    assert tiny_tokenizer().decode(row["input_ids"]) == "first paragraph<|im_end|>second one<|im_end|>third<|im_end|>"
    assert len(build(path, max_length=16, drop_last=True)) == len(whole) - 1
    assert len(build(path, max_length=8, limit=2)) == 2
    assert build(path, split="validation") is None


def test_record_files_use_a_field_and_name_bad_rows(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"body": 3}) + "\n")
    with pytest.raises(DataError, match=r"docs.jsonl:2: field 'body'"):
        build(path, field="body")
    path.write_text(json.dumps({"body": "hello world"}) + "\n")
    (row,) = build(path, field="body")
    assert len(row["input_ids"]) == len("hello world") + 1


def test_rows_train_on_every_token(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog " * 4)
    rows = build(path, max_length=32)
    total, count = token_loss(tiny_llama(), collate(rows, tiny_tokenizer().pad_token_id))
    assert count == sum(len(r["input_ids"]) - 1 for r in rows) and total.item() > 0
