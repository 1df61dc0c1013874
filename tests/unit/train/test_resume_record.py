"""train/resume: what a checkpoint's run record must match before a run resumes from it."""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.train.resume import RECORD, check_resume, differences, restore_rng, run_record

SPEC = {"base": "tiny", "base_dtype": "bfloat16", "trainable_dtype": "float32", "quantizer": None,
        "delta": [{"name": "lora", "config": {"r": 8, "alpha": 16}}], "optimizer": "adamw"}


def changed(**delta_config) -> dict:
    spec = {**SPEC, "delta": [{"name": "lora", "config": {**SPEC["delta"][0]["config"], **delta_config}}]}
    return spec


def test_differences_name_every_changed_leaf_with_its_path():
    assert differences(SPEC, SPEC) == []
    assert differences(SPEC, changed(r=16)) == ["delta[0].config.r: 8 in the checkpoint, 16 now"]
    assert differences(SPEC, {**SPEC, "quantizer": {"name": "nf4", "config": {}}}) == [
        "quantizer: None in the checkpoint, {'name': 'nf4', 'config': {}} now"]


def test_a_renamed_plugin_is_reported_by_name_only():
    other = {**SPEC, "delta": [{"name": "dora", "config": {"r": 4}}]}
    assert differences(SPEC, other) == ["delta[0].name: 'lora' in the checkpoint, 'dora' now"]


def test_check_resume_refuses_another_spec_naming_the_checkpoint_and_the_option():
    checkpoint = {RECORD: {"spec": SPEC}, "state_dict": {"a": torch.zeros(1)}}
    check_resume(checkpoint, SPEC, {"a"}, "last.ckpt")
    with pytest.raises(ConfigError, match=r"last\.ckpt.*delta\[0\]\.config\.alpha: 16 in the checkpoint, 32 now"):
        check_resume(checkpoint, changed(alpha=32), {"a"}, "last.ckpt")


def test_check_resume_refuses_tensors_that_do_not_fit():
    checkpoint = {RECORD: {"spec": SPEC}, "state_dict": {"a": torch.zeros(1), "stale": torch.zeros(1)}}
    with pytest.raises(ConfigError, match=r"missing \['b'\], unexpected \['stale'\]"):
        check_resume(checkpoint, SPEC, {"a", "b"}, "epoch=0.ckpt")


def test_the_random_state_of_the_record_continues_the_same_sequence():
    class Report:
        base_metrics, base_samples, history = {}, [], {}

    torch.manual_seed(11)
    record = run_record(SPEC, Report())
    expected = torch.rand(4)
    torch.rand(100)  # the interrupted run drew more
    restore_rng(record)
    assert torch.equal(torch.rand(4), expected)
