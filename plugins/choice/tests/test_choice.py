"""choice: the evaluator contract; rows without options are not scored."""

from __future__ import annotations

from deltatune.plugin.resolve import resolve
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.testing import EvaluatorContract, sample_rows


class TestChoiceContract(EvaluatorContract):
    evaluator_name = "choice"
    expected_metrics = {"accuracy", "accuracy_norm", "rows"}
    wrapped_with = {"name": "lora", "config": {"targets": "all-linear"}}


def test_rows_without_options_or_with_a_bad_answer_index_are_skipped():
    tokenizer = tiny_tokenizer()
    rows = sample_rows(tokenizer)
    rows[0] = {k: v for k, v in rows[0].items() if k != "choices"}
    rows[1]["answer_index"] = 5
    plugin = resolve("evaluator", {"name": "choice", "config": {"by_family": True}})
    metrics = plugin.plugin.evaluate(tiny_llama(), tokenizer, rows, plugin.cfg)
    assert metrics["rows"] == 2.0 and "accuracy.?" in metrics
    assert plugin.plugin.evaluate(tiny_llama(), tokenizer, rows[:2], plugin.cfg) == {"rows": 0.0}
