"""template: labelled rows of any fields → instruction/response pairs through seeded templates."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from deltatune.api import ConfigError, DataError
from deltatune.plugin.resolve import resolve
from deltatune.model.loading import tiny_tokenizer
from deltatune.testing import DatasetBuilderContract

TEMPLATES = [{"prompt": "What is {a} plus {b}?", "response": "{answer}"},
             {"prompt": "Add {a} and {b}.", "response": "{answer}"},
             {"prompt": "Sum: {a} + {b} =", "response": "{answer}"}]
FIELDS_CSV = "examples/data/tasks-train.fields.csv"


class TestTemplateContract(DatasetBuilderContract):
    builder_name = "template"
    config = {"templates": TEMPLATES}
    records = [{"a": 2, "b": 3, "answer": "5", "family": "add"}, {"a": 10, "b": 5, "answer": "15"}]
    malformed = ["{oops", {"a": 1, "answer": "1"}]


def build(path, split="train", **config):
    builder = resolve("dataset_builder", {"name": "template", "config": {"path": str(path), **config}})
    return builder.plugin.build(builder.cfg, tiny_tokenizer(), split)


def test_csv_rows_are_templated_with_a_seeded_draw_per_row():
    templates = [{"prompt": "Family {family}: {a} {b}", "response": "{answer}"},
                 {"prompt": "Task {family}. Data: {a} / {b}", "response": "Answer: {answer}"}]
    rows = build(FIELDS_CSV, templates=templates, seed=1)
    assert len(rows) == 200
    again = build(FIELDS_CSV, templates=templates, seed=1)
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in again]
    used = Counter(r["template"] for r in rows)
    assert set(used) == {0, 1} and min(used.values()) > 60, "both templates are drawn, about evenly"
    other = build(FIELDS_CSV, templates=templates, seed=2)
    assert [r["template"] for r in rows] != [r["template"] for r in other]
    limited = build(FIELDS_CSV, templates=templates, seed=1, limit=5)
    assert [r["template"] for r in limited] == [r["template"] for r in rows[:5]], "draws do not depend on limit"
    first = rows[0]
    assert first["family"] == "add" and "256 748" in first["prompt"] or "256 / 748" in first["prompt"]
    reverse = next(r for r in rows if r["family"] == "reverse")
    assert reverse["prompt"].count("None") == 0, "an empty CSV cell formats as empty text"


def test_parquet_rows_go_through_datasets_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": [1, 7], "b": [2, 8], "answer": ["3", "15"]}), path)
    rows = build(path, templates=TEMPLATES[:1], chat="plain")
    assert [r["prompt"] for r in rows] == ["What is 1 plus 2?", "What is 7 plus 8?"]
    assert [r["response"] for r in rows] == ["3", "15"]


def test_missing_field_names_file_and_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,answer\n1,2,3\n4,5,9\n")
    with pytest.raises(DataError, match=r"rows.csv:2: template 0 uses field\(s\) \['c'\]"):
        build(path, templates=[{"prompt": "{a} {c}", "response": "{answer}"}])
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"a": 1, "answer": 2}) + "\n" + json.dumps({"answer": 3}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2: .*\['a'\]"):
        build(jsonl, templates=[{"prompt": "{a}", "response": "{answer}"}])


def test_bad_csv_and_bad_templates_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_text('a,b\n1,2\n3,"unterminated\n')
    with pytest.raises(DataError, match="broken.csv"):
        build(broken, templates=TEMPLATES)
    with pytest.raises(ConfigError, match="templates"):
        resolve("dataset_builder", {"name": "template", "config": {"path": "x.csv", "templates": [{"prompt": "{a"}]}})
    with pytest.raises(ConfigError, match="templates"):
        resolve("dataset_builder", {"name": "template", "config": {"path": "x.csv", "templates": []}})


def test_chat_template_variables_reach_the_prompt_and_stay_on_the_row(tmp_path):
    from deltatune.testing.chat_templates import QWEN3, tokenizer_with

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"a": 2, "b": 3, "answer": "5"}) + "\n")
    builder = resolve("dataset_builder", {"name": "template", "config": {
        "path": str(path), "templates": TEMPLATES[:1], "chat_template_kwargs": {"enable_thinking": False}}})
    (row,) = builder.plugin.build(builder.cfg, tokenizer_with(QWEN3), "train")
    assert row["prompt"].endswith("What is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert row["chat_template_kwargs"] == {"enable_thinking": False}
