"""chat: OpenAI and ShareGPT conversations through the tokenizer's chat template, loss placement."""

from __future__ import annotations

import json

import pytest

from deltatune.api import DataError
from deltatune.plugin.resolve import resolve
from deltatune.model.loading import tiny_tokenizer
from deltatune.testing import DatasetBuilderContract

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 and 4?"},
    {"role": "assistant", "content": "8"},
]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}],
            "family": "add"}


class TestChatContract(DatasetBuilderContract):
    builder_name = "chat"
    records = [CONVERSATION, SHAREGPT, {"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"}]}]
    malformed = [
        "{not json",
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]},
        {"text": "neither format"},
    ]
    # a multi-turn row's prompt holds the earlier assistant turns, which carry loss by default
    prompt_fully_masked = False


def build(tmp_path, records, split="train", **config):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    builder = resolve("dataset_builder", {"name": "chat", "config": {"path": str(path), **config}})
    return builder.plugin.build(builder.cfg, tiny_tokenizer(), split)


def labelled_text(row) -> str:
    """The labelled tokens, decoded; runs of labels separated by '|'."""
    tokenizer, parts, run = tiny_tokenizer(), [], []
    for label in row["labels"] + [-100]:
        if label != -100:
            run.append(label)
        elif run:
            parts.append(tokenizer.decode(run))
            run = []
    return "|".join(parts)


def test_loss_on_every_assistant_turn_through_its_end_token(tmp_path):
    (row,) = build(tmp_path, [CONVERSATION])
    assert labelled_text(row) == "5<|im_end|>|8<|im_end|>"
    (last,) = build(tmp_path, [CONVERSATION], train_on="last")
    assert labelled_text(last) == "8<|im_end|>"
    (every,) = build(tmp_path, [CONVERSATION], train_on="all")
    assert every["labels"][1:] == every["input_ids"][1:]
    assert row["input_ids"] == last["input_ids"] == every["input_ids"]


def test_prompt_is_the_inference_prompt_of_the_last_turn(tmp_path):
    (row,) = build(tmp_path, [CONVERSATION])
    tokenizer = tiny_tokenizer()
    expected = tokenizer.apply_chat_template(CONVERSATION["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == expected and row["response"] == "8"
    prompt_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert row["input_ids"][:len(prompt_ids)] == prompt_ids, "training tokens start with the inference prompt"


def test_sharegpt_and_openai_rows_encode_alike_and_system_prompt_is_added(tmp_path):
    openai = {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]}
    a, b = build(tmp_path, [SHAREGPT, openai])
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and a["family"] == "add"
    (with_system,) = build(tmp_path, [openai], system_prompt="Be brief.")
    assert with_system["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    (kept,) = build(tmp_path, [CONVERSATION], system_prompt="Other.")
    assert "Other." not in kept["prompt"], "a conversation's own system message wins"


def test_long_conversations_are_cut_and_counted(tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y" * 60}]}
    rows = build(tmp_path, [long, long], max_length=40)
    assert rows == [], "no response token fits in 40 bytes after a 60-byte prompt"
    assert "2 dropped" in capsys.readouterr().out
    (cut,) = build(tmp_path, [long], max_length=100)
    assert len(cut["input_ids"]) == 100


def test_format_can_be_forced_and_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"chat.jsonl:2: no 'messages' or 'conversations'"):
        build(tmp_path, [SHAREGPT, {"x": 1}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: 'messages' must be a non-empty list"):
        build(tmp_path, [SHAREGPT], format="openai")
