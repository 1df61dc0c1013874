"""The perplexity evaluator against deltatune's evaluator contract (``deltatune.testing``)."""

from deltatune.testing import EvaluatorContract


class TestPerplexityContract(EvaluatorContract):
    evaluator_name = "perplexity"
    expected_metrics = {"loss", "perplexity", "tokens"}
    wrapped_with = {"name": "lora", "config": {"targets": "all-linear"}}


class TestPerplexityBatchedContract(EvaluatorContract):
    evaluator_name = "perplexity"
    config = {"batch_size": 1, "limit": 3}
    expected_metrics = {"loss", "perplexity", "tokens"}
    wrapped_with = {"name": "lora", "config": {"targets": "all-linear"}}
