"""Perplexity: the mean token-level cross-entropy of the labelled tokens, and its exponential."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import Row, collate, compute_context, hookimpl, token_loss


class PerplexityConfig(BaseModel):
    """Options of the ``perplexity`` evaluator."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate at most this many rows")


class Perplexity:
    """The ``perplexity`` evaluator: ``loss`` (nats per labelled token) and ``perplexity``."""

    name: ClassVar[str] = "perplexity"
    Config: ClassVar[type[BaseModel]] = PerplexityConfig

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: PerplexityConfig) -> dict[str, float]:
        """Token-weighted loss over ``rows`` and its perplexity."""
        rows = rows[: cfg.limit] if cfg.limit else rows
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(rows), cfg.batch_size):
            batch = collate(rows[start:start + cfg.batch_size], tokenizer.pad_token_id)
            with compute_context(model):
                loss, n = token_loss(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss), count + n
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": float(count)}


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``perplexity``."""
    register(Perplexity)
