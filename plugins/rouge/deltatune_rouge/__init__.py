"""ROUGE of greedy generations against the reference responses, with Google's ``rouge-score``
package: the mean F-measure of each configured type (``rougeL`` by default: longest common
subsequence), on every row with a ``prompt`` and a ``response``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field
from rouge_score import rouge_scorer
from torch import nn

from deltatune.api import GenerationOptions, Row, answer_rows, generate_answers, hookimpl, summarize

RougeType = Literal["rouge1", "rouge2", "rougeL", "rougeLsum"]


class RougeConfig(GenerationOptions):
    """Options of the ``rouge`` evaluator."""

    max_new_tokens: int = Field(48, gt=0, description="tokens generated per answer")
    types: list[RougeType] = Field(["rougeL"], min_length=1, description="ROUGE variants reported")
    use_stemmer: bool = Field(False, description="stem words (Porter) before matching")


class Rouge:
    """The ``rouge`` evaluator: mean F-measure per ROUGE type (``rougeL``, …)."""

    name: ClassVar[str] = "rouge"
    Config: ClassVar[type[BaseModel]] = RougeConfig

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: RougeConfig) -> dict[str, float]:
        """Mean ROUGE F-measure of the greedy answers against the references."""
        rows = answer_rows(rows, cfg.limit)
        answers = generate_answers(model, tokenizer, rows, cfg)
        scorer = rouge_scorer.RougeScorer(cfg.types, use_stemmer=cfg.use_stemmer)
        scores = [scorer.score(r["response"], a) for r, a in zip(rows, answers)]
        metrics: dict[str, float] = {}
        for kind in cfg.types:
            metrics.update(summarize(rows, [s[kind].fmeasure for s in scores], kind, cfg.by_family))
        return metrics


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``rouge``."""
    register(Rouge)
