"""The causal-LM loss, computed only where a label exists.

Instruction tuning masks the prompt and the padding, so most positions carry no loss. Instead of
projecting every hidden state through the LM head (``batch x length x vocabulary`` logits), the loss
gathers the hidden states of labelled positions first and projects only those, in chunks
(:func:`deltatune.train.head_loss.head_loss`), so logits never exceed one chunk, in forward or backward.

:func:`token_loss` first asks :mod:`deltatune.train.fast` for a fast training forward of the model
(one computing the same loss faster, such as the Llama family's on unpadded tokens); ``fast=False``,
a model without one, or a batch it does not take uses the plain Hugging Face decoder forward below.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.data.packing import IGNORE_INDEX
from deltatune.model.forward import hidden_states
from deltatune.train import fast as fast_forwards
from deltatune.train.head_loss import head_loss
from deltatune.train.update_in_backward import deferred_lookup, deferred_tied_head


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor], fast: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum of token cross-entropies, number of labelled tokens)`` of next-token prediction.

    ``fast`` allows the model's fast training forward (:func:`deltatune.train.fast.fast_forward`: same
    result, computed faster) where it has one and it takes the batch.
    """
    forward = fast_forwards.fast_forward(model) if fast else None
    result = forward(batch) if forward is not None else None
    if result is not None:
        return result
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return next(model.parameters()).new_zeros((), dtype=torch.float32), 0
    deferred = deferred_tied_head(model)
    with deferred_lookup(model, deferred):
        hidden = hidden_states(model, batch)[:, :-1][mask]
    return head_loss(model.get_output_embeddings(), hidden, labels[mask], deferred), count


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor], fast: bool = True) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens (0 when the batch has none)."""
    total, count = token_loss(model, batch, fast)
    return total / max(count, 1)
