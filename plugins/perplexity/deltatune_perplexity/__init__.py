"""Perplexity: the mean token-level cross-entropy of the labelled tokens, and its exponential."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from deltatune.api import EvaluatorOptions, Row, collate, compute_context, hookimpl, length_batches, token_loss


class PerplexityConfig(EvaluatorOptions):
    """Options of the ``perplexity`` evaluator (batch size, row limit)."""


class Perplexity:
    """The ``perplexity`` evaluator: ``loss`` (nats per labelled token) and ``perplexity``."""

    name: ClassVar[str] = "perplexity"
    Config: ClassVar[type[BaseModel]] = PerplexityConfig
    default: ClassVar[bool] = True  # the evaluator of a run that names none

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: PerplexityConfig) -> dict[str, float]:
        """Token-weighted loss over ``rows`` and its perplexity; rows are batched by length
        (:func:`~deltatune.api.length_batches`)."""
        rows = rows[: cfg.limit] if cfg.limit else rows
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for indices in length_batches(rows, cfg.batch_size):
            batch = collate([rows[i] for i in indices], tokenizer.pad_token_id)
            with compute_context(model):
                loss, n = token_loss(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss), count + n
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": float(count)}


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``perplexity``."""
    register(Perplexity)
