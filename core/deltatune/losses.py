"""The causal-LM loss, computed only where a label exists.

Instruction tuning masks the prompt and the padding, so most positions carry no loss. Instead of
projecting every hidden state through the LM head (``batch x length x vocabulary`` logits), the loss
gathers the hidden states of labelled positions first and projects only those, in chunks, so the
fp32 logits never exceed ``chunk x vocabulary`` at a time beyond what backward keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

CHUNK_TOKENS = 2048


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states of ``model`` (a Hugging Face causal LM) for ``batch``."""
    decoder = model.get_decoder()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return decoder(**kwargs, use_cache=False).last_hidden_state


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of token cross-entropies, number of labelled tokens)`` of next-token prediction."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    count = int(mask.sum())
    hidden = hidden_states(model, batch)[:, :-1][mask]
    targets = labels[mask]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, CHUNK_TOKENS):
        logits = head(hidden[start:start + CHUNK_TOKENS]).float()
        total = total + F.cross_entropy(logits, targets[start:start + CHUNK_TOKENS], reduction="sum")
    return total, count


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens (0 when the batch has none)."""
    total, count = token_loss(model, batch)
    return total / max(count, 1)
