"""exact_match: the evaluator contract, and the answer normalisation it promises."""

from __future__ import annotations

from deltatune.evaluation.helpers import normalize_answer
from deltatune.testing import EvaluatorContract


class TestExactMatchContract(EvaluatorContract):
    evaluator_name = "exact_match"
    config = {"max_new_tokens": 4, "by_family": False}
    expected_metrics = {"accuracy", "rows"}
    wrapped_with = {"name": "lora", "config": {"targets": "all-linear"}}


def test_normalisation_ignores_case_surrounding_punctuation_and_spaces():
    assert normalize_answer("  Paris.\n") == normalize_answer("paris") == "paris"
    assert normalize_answer('"1004"') == "1004"
    assert normalize_answer('{"a": 1}') == 'a": 1', "only surrounding punctuation goes"
    assert normalize_answer('{"a": 1}') != normalize_answer('{"a": "1"}')
    assert normalize_answer("blue tree apple") != normalize_answer("apple tree blue")
    assert normalize_answer("ÉCOLE") == "école"
