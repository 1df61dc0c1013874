"""alpaca renders its chat prompts with ``chat_template_kwargs`` (Qwen3's real template, thinking off)
and its rows keep them, so the run's sample table reads the user's text back."""

import json

from deltatune.model.generation import user_text
from deltatune.plugin.resolve import resolve
from deltatune.testing.chat_templates import QWEN3, tokenizer_with


def test_chat_prompts_are_rendered_with_the_template_variables(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Add 2 and 3.", "output": "5"}) + "\n")
    tokenizer = tokenizer_with(QWEN3)
    for variables, ending in (({"enable_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                              ({}, "<|im_start|>assistant\n")):
        builder = resolve("dataset_builder", {"name": "alpaca",
                                              "config": {"path": str(path), "chat_template_kwargs": variables}})
        (row,) = builder.plugin.build(builder.cfg, tokenizer, "train")
        assert row["prompt"].endswith(ending)
        assert row.get("chat_template_kwargs", {}) == variables
        assert user_text(tokenizer, row["prompt"], row.get("chat_template_kwargs")) == "Add 2 and 3."
