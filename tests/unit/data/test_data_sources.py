"""Data sources: weighted mixing (reproducible by seed), extra evaluation sets, CSV through datasets."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from deltatune.errors import ConfigError, DataError
from deltatune.data.module import InstructionDataModule, read_records
from deltatune.data.mixing import mix_counts, mix_rows

TRAIN = "examples/data/tasks-train.jsonl"
CHAT = "examples/data/tasks-validation.chat.jsonl"  # other problems than TRAIN holds


def test_mix_counts_follow_the_weights_and_sum_to_the_total():
    assert mix_counts([2, 1], 90) == [60, 30]
    assert sorted(mix_counts([1, 1, 1], 10)) == [3, 3, 4]
    assert sum(mix_counts([0.3, 0.7], 7)) == 7


def test_mixed_rows_keep_proportions_repeat_small_sets_and_are_seeded():
    big = [{"src": "big", "i": i} for i in range(100)]
    small = [{"src": "small", "i": i} for i in range(10)]
    mixed = mix_rows([big, small], [1, 1], seed=4, size=60)
    assert Counter(r["src"] for r in mixed) == {"big": 30, "small": 30}
    assert Counter(r["i"] for r in mixed if r["src"] == "small") == {i: 3 for i in range(10)}
    assert mixed == mix_rows([big, small], [1, 1], seed=4, size=60)
    assert mixed != mix_rows([big, small], [1, 1], seed=5, size=60)


def test_data_module_mixes_builders_from_yaml_and_adds_extra_sets():
    config = yaml.safe_load(f"""
    builder:
      - {{name: alpaca, config: {{path: {TRAIN}, limit: 60}}, weight: 3}}
      - {{name: chat, config: {{path: {CHAT}, limit: 40}}, weight: 1}}
    mix_size: 80
    val_fraction: 0.25
    extra_eval:
      heldout: examples/data/tasks-heldout.jsonl
      heldout_chat: {{name: chat, config: {{path: examples/data/tasks-heldout.chat.jsonl, limit: 5}}}}
    """)
    dm = InstructionDataModule(base="tiny-llama", **config)
    dm.setup()
    train = dm.rows("train")
    assert len(train) == 80
    assert len(dm.rows("validation")) == 15 + 10, "each dataset holds out its own validation rows"
    assert len(dm.rows("heldout")) == 256 and len(dm.rows("heldout_chat")) == 5
    assert dm.eval_splits() == ["validation", "heldout", "heldout_chat"]
    validation_prompts = {r["prompt"] for r in dm.rows("validation")}
    assert not validation_prompts & {r["prompt"] for r in train}, "no held-out row is trained on"
    again = InstructionDataModule(base="tiny-llama", **config)
    again.setup()
    assert [r["input_ids"] for r in again.rows("train")] == [r["input_ids"] for r in train]


def test_bad_mix_and_extra_eval_settings_fail_before_loading():
    with pytest.raises(ConfigError, match="weight"):
        InstructionDataModule(builder=[{"name": "alpaca", "config": {"path": TRAIN}, "weight": 0}])
    with pytest.raises(ConfigError, match="empty list"):
        InstructionDataModule(builder=[])
    with pytest.raises(ConfigError, match="clashes"):
        InstructionDataModule(builder={"name": "alpaca", "config": {"path": TRAIN}}, extra_eval={"test": TRAIN})
    with pytest.raises(ConfigError, match="exclude each other"):
        InstructionDataModule(builder={"name": "alpaca", "config": {"path": TRAIN}}, packing=True, group_by_length=True)


def test_csv_records_come_through_datasets_with_file_lines(tmp_path):
    rows = list(read_records("examples/data/tasks-train.fields.csv"))
    line, first = rows[0]
    assert line == 2 and first["family"] == "add" and str(first["answer"]) == "1004"
    assert len(rows) == 200 and rows[1][1]["b"] is None, "an empty cell is None"
    missing = tmp_path / "none.csv"
    with pytest.raises(DataError, match="data file not found"):
        list(read_records(missing))
