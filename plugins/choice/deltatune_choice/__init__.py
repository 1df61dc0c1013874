"""Multiple choice by log-likelihood, as the lm-eval harness scores it: for every row with
``choices`` (option texts) and ``answer_index``, the model's log-probability of each option as the
response to the row's ``prompt`` is computed, and the row counts when the most likely option is the
right one. ``accuracy`` compares summed log-probabilities; ``accuracy_norm`` divides them by the
option's length in bytes first (lm-eval's ``acc_norm``), which removes the bias towards short options.
The option is scored as the builder encodes a response: its tokens and the end-of-sequence token
(``eos: false`` leaves the latter out).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field
from torch import nn

from deltatune.api import DataError, EvaluatorOptions, Row, encode_example, hookimpl, sequence_logprobs, summarize


class ChoiceConfig(EvaluatorOptions):
    """Options of the ``choice`` evaluator: the shared batch size and row limit, and how options are scored."""

    eos: bool = Field(True, description="score the end-of-sequence token after each option")
    max_length: int = Field(1024, gt=8, description="tokens of a prompt with one option")
    by_family: bool = Field(False, description="also report the accuracy per task family")


def choice_rows(rows: list[Row], limit: int | None) -> list[Row]:
    """Rows that carry a prompt, at least two choices and a valid answer index."""
    usable = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("choices"), list)
              and len(r["choices"]) >= 2 and isinstance(r.get("answer_index"), int)
              and 0 <= r["answer_index"] < len(r["choices"])]
    return usable[:limit] if limit else usable


class Choice:
    """The ``choice`` evaluator."""

    name: ClassVar[str] = "choice"
    Config: ClassVar[type[BaseModel]] = ChoiceConfig

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: ChoiceConfig) -> dict[str, float]:
        """Accuracy of picking the most likely option (raw and length-normalised)."""
        rows = choice_rows(rows, cfg.limit)
        options = []
        for row in rows:
            for text in row["choices"]:
                encoded = encode_example(tokenizer, row["prompt"], str(text), cfg.max_length)
                if encoded is None:
                    raise DataError(f"choice: option {text!r} does not fit in max_length={cfg.max_length} after its "
                                    "prompt; raise the evaluator's max_length")
                if not cfg.eos:
                    encoded["labels"][-1] = -100
                options.append(encoded)
        logprobs = sequence_logprobs(model, options, tokenizer.pad_token_id, cfg.batch_size)
        raw, norm, start = [], [], 0
        for row in rows:
            scores = logprobs[start:start + len(row["choices"])]
            start += len(row["choices"])
            lengths = [max(len(str(c).encode()), 1) for c in row["choices"]]
            raw.append(float(max(range(len(scores)), key=scores.__getitem__) == row["answer_index"]))
            normed = [s / n for s, n in zip(scores, lengths)]
            norm.append(float(max(range(len(normed)), key=normed.__getitem__) == row["answer_index"]))
        return {**summarize(rows, raw, "accuracy", cfg.by_family),
                **summarize(rows, norm, "accuracy_norm", cfg.by_family)}


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``choice``."""
    register(Choice)
