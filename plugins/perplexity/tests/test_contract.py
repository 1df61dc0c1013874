"""The perplexity evaluator against deltatune's evaluator contract (``deltatune.testing``)."""

from deltatune.testing import EvaluatorContract


class TestPerplexityContract(EvaluatorContract):
    evaluator_name = "perplexity"
    expected_metrics = {"loss", "perplexity", "tokens"}


class TestPerplexityBatchedContract(EvaluatorContract):
    evaluator_name = "perplexity"
    config = {"batch_size": 1, "limit": 3}
    expected_metrics = {"loss", "perplexity", "tokens"}
