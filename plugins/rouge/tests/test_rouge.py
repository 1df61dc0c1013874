"""rouge: the evaluator contract and its options."""

from __future__ import annotations

import pytest

from deltatune.api import ConfigError
from deltatune.plugin.resolve import resolve
from deltatune.testing import EvaluatorContract


class TestRougeContract(EvaluatorContract):
    evaluator_name = "rouge"
    config = {"max_new_tokens": 4, "types": ["rougeL", "rouge1"]}
    expected_metrics = {"rougeL", "rouge1", "rows"}
    wrapped_with = {"name": "lora", "config": {"targets": "all-linear"}}


def test_unknown_rouge_type_is_a_configuration_error():
    with pytest.raises(ConfigError, match="types"):
        resolve("evaluator", {"name": "rouge", "config": {"types": ["rougeX"]}})
