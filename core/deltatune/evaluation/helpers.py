"""What evaluator plugins share: which rows they read, batched generation, answer normalisation,
per-family breakdowns and sequence log-likelihoods; and how a run names its evaluators and splits.

Evaluators receive the rows a dataset builder made (``input_ids``, ``labels``, and where the builder
knows them ``prompt`` and ``response`` text, ``choices`` and ``answer_index``, ``family``). The
helpers here let each evaluator plugin stay a few lines long, with no logic copied between them.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.plugin.resolve import PluginRef
from deltatune.model.generation import generate
from deltatune.model.logits import labelled_logits
from deltatune.data.packing import IGNORE_INDEX, collate
from deltatune.model.assembly import compute_context
from deltatune.plugin.protocols import Row


class EvaluatorRef(PluginRef):
    """An evaluator reference with the evaluation sets it runs on (``None``: every one)."""

    splits: list[str] | None = Field(None, description="evaluation sets (validation, test, extra_eval names)")


class EvaluatorOptions(BaseModel):
    """Options every evaluator that runs the model in batches shares: the base of an evaluator's ``Config``."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, gt=0, description="rows run through the model at once")
    limit: int | None = Field(None, gt=0, description="evaluate at most this many rows")


class GenerationOptions(EvaluatorOptions):
    """Options shared by evaluators that generate: the ``Config`` base of ``exact_match`` and ``rouge``."""

    max_new_tokens: int = Field(24, gt=0, description="tokens generated per answer")
    by_family: bool = Field(False, description="also report the metric per task family")


def answer_rows(rows: Sequence[Row], limit: int | None = None) -> list[Row]:
    """The rows that carry ``prompt`` and ``response`` text (at most ``limit``)."""
    usable = [r for r in rows if isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str)]
    return usable[:limit] if limit else usable


def generate_answers(model: nn.Module, tokenizer: Any, rows: Sequence[Row], opts: GenerationOptions,
                     **generation: Any) -> list[str]:
    """Completions of every row's ``prompt``, batched by prompt length (less left padding): greedy,
    unless ``generation`` passes :func:`deltatune.model.generation.generate` other options (``stop``,
    ``temperature``, ``top_p``, ``seed``, ``strip``)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
    outputs = generate(model, tokenizer, [rows[i]["prompt"] for i in order], opts.max_new_tokens, opts.batch_size,
                       **generation)
    answers = [""] * len(rows)
    for i, out in zip(order, outputs):
        answers[i] = out
    return answers


def normalize_answer(text: str) -> str:
    """Comparison form of an answer: stripped, case-folded, surrounding punctuation and spaces removed."""
    return text.strip().casefold().strip(string.punctuation + string.whitespace)


def summarize(rows: Sequence[Row], scores: Sequence[float], metric: str, by_family: bool) -> dict[str, float]:
    """``{metric: mean, "rows": n}`` plus ``{metric.family: mean}`` per family when ``by_family``
    (only ``{"rows": 0}`` when no row could be scored: no figure is better than a made-up 0)."""
    if not scores:
        return {"rows": 0.0}
    result = {metric: sum(scores) / len(scores), "rows": float(len(scores))}
    if by_family:
        groups: dict[str, list[float]] = defaultdict(list)
        for row, score in zip(rows, scores):
            groups[str(row.get("family", "?"))].append(score)
        result.update({f"{metric}.{family}": sum(v) / len(v) for family, v in sorted(groups.items())})
    return result


def length_batches(rows: Sequence[Row], batch_size: int) -> list[list[int]]:
    """The indices of ``rows`` in batches of ``batch_size``, by token count: a batch's rows have
    similar lengths, so little of it is padding (a short row batched with a long one would be padded
    to its length, and attention computed over the padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def sequence_logprobs(model: nn.Module, rows: Sequence[Row], pad_id: int, batch_size: int = 16) -> list[float]:
    """The summed log-probability of each row's labelled tokens given the tokens before them.

    Only labelled positions are projected through the LM head, so the cost is that of a forward
    pass plus ``labelled tokens x vocabulary``.
    """
    device = next(model.parameters()).device
    sums = [0.0] * len(rows)
    for indices in length_batches(rows, batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices], pad_id).items()}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        with compute_context(model):
            logits = labelled_logits(model, batch, mask)
        picked = torch.log_softmax(logits, dim=-1).gather(1, labels[mask].unsqueeze(1)).squeeze(1)
        per_row = torch.zeros(labels.shape[0], dtype=torch.float64, device=device)
        per_row.index_add_(0, mask.nonzero()[:, 0], picked.double())
        for i, value in zip(indices, per_row.tolist()):
            sums[i] = value
    return sums
