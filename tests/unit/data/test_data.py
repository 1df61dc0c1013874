"""Instruction data: masking, truncation accounting, malformed rows named by file and line."""

from __future__ import annotations

import gzip
import json

import pytest

from deltatune.errors import DataError
from deltatune.plugin.resolve import resolve
from deltatune.data.module import IGNORE_INDEX, TruncationStats, collate, encode_example, read_jsonl
from deltatune.model.loading import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def build(tmp_path, lines, **config):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    builder = resolve("dataset_builder", {"name": "alpaca", "config": {"path": str(path), **config}})
    return builder.plugin.build(builder.cfg, tiny_tokenizer(), "train")


def test_loss_only_on_the_response_by_default(tokenizer):
    row = encode_example(tokenizer, "Say hi: ", "hi", max_length=64)
    prompt_len = len(tokenizer("Say hi: ")["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    full = encode_example(tokenizer, "Say hi: ", "hi", max_length=64, train_on_prompt=True)
    assert full["labels"] == full["input_ids"]


def test_truncation_keeps_the_response_and_counts_what_was_cut(tokenizer):
    stats = TruncationStats()
    row = encode_example(tokenizer, "x" * 100, "answer", max_length=40, stats=stats)
    assert len(row["input_ids"]) == 40
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]).startswith("answer")
    assert (stats.prompts_cut, stats.responses_cut, stats.dropped) == (1, 0, 0)
    long = encode_example(tokenizer, "p" * 10, "r" * 100, max_length=40, stats=stats)
    assert len(long["input_ids"]) == 40 and stats.responses_cut == 1


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    with pytest.raises(DataError, match=r"data.jsonl:3: not valid JSON"):
        build(tmp_path, [good, good, "{oops", good])
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'output' is missing"):
        build(tmp_path, [good, json.dumps({"instruction": "a"})])


def test_gzip_compressed_jsonl_reads_like_plain_and_names_its_bad_line(tmp_path):
    lines = [json.dumps({"a": 1}), "", json.dumps({"a": 2})]
    packed = tmp_path / "data.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    assert list(read_jsonl(packed)) == [(1, {"a": 1}), (3, {"a": 2})]
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write(lines[0] + "\n{oops\n")
    with pytest.raises(DataError, match=r"data.jsonl.gz:2: not valid JSON"):
        list(read_jsonl(packed))


def test_missing_data_file_is_a_clear_error(tmp_path):
    builder = resolve("dataset_builder", {"name": "alpaca", "config": {"path": str(tmp_path / "none.jsonl")}})
    with pytest.raises(DataError, match="data file not found: .*none.jsonl"):
        builder.plugin.build(builder.cfg, tiny_tokenizer(), "train")


def test_alpaca_uses_the_chat_template_and_keeps_text_for_evaluators(tmp_path):
    rows = build(tmp_path, [json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"})])
    assert rows[0]["prompt"].startswith("<|im_start|>user\nAdd\n\n2 and 3<|im_end|>")
    assert rows[0]["response"] == "5"
    classic = build(tmp_path, [json.dumps({"instruction": "Add", "output": "5"})], template="alpaca")
    assert "### Instruction:\nAdd" in classic[0]["prompt"]


def test_collate_pads_with_ignored_labels():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_encode_segments_labels_flagged_segments_and_accounts_for_cuts(tokenizer):
    from deltatune.data.module import encode_segments

    stats = TruncationStats()
    row = encode_segments(tokenizer, [("ask: ", False), ("answer", True), ("\n", False)], 64, stats)
    assert [t for t in row["labels"] if t != IGNORE_INDEX] == tokenizer("answer")["input_ids"]
    assert len(row["input_ids"]) == len(row["labels"]) == len("ask: answer\n")
    cut = encode_segments(tokenizer, [("p" * 10, False), ("r" * 20, True)], 16, stats)
    assert len(cut["input_ids"]) == 16 and stats.responses_cut == 1
    assert encode_segments(tokenizer, [("p" * 30, False), ("r", True)], 16, stats, line=7) is None
    assert stats.dropped == 1 and stats.dropped_lines == [7] and stats.examples == 3


def test_user_prompt_modes(tokenizer):
    from deltatune.data.module import user_prompt

    assert user_prompt(tokenizer, "hi", "plain") == "hi"
    assert user_prompt(tokenizer, "hi", "auto") == user_prompt(tokenizer, "hi", "chat") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
