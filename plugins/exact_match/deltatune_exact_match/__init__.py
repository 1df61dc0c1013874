"""Exact match: greedy generation on every row with a ``prompt`` and a ``response``; a row counts
when the generated answer equals the reference after normalisation (stripped, case-folded,
surrounding punctuation and whitespace removed). Reports ``accuracy`` (0–1) and, with
``by_family``, the accuracy of each task family.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel
from torch import nn

from deltatune.api import GenerationOptions, Row, answer_rows, generate_answers, hookimpl, normalize_answer, summarize


class ExactMatchConfig(GenerationOptions):
    """Options of the ``exact_match`` evaluator (generation length, batch size, row limit, per family)."""


class ExactMatch:
    """The ``exact_match`` evaluator."""

    name: ClassVar[str] = "exact_match"
    Config: ClassVar[type[BaseModel]] = ExactMatchConfig

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: ExactMatchConfig) -> dict[str, float]:
        """Share of rows whose normalised greedy answer equals the normalised reference."""
        rows = answer_rows(rows, cfg.limit)
        answers = generate_answers(model, tokenizer, rows, cfg)
        scores = [float(normalize_answer(a) == normalize_answer(r["response"])) for a, r in zip(answers, rows)]
        return summarize(rows, scores, "accuracy", cfg.by_family)


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``exact_match``."""
    register(ExactMatch)
