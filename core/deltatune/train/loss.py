"""The causal-LM loss, computed only where a label exists.

Instruction tuning masks the prompt and the padding, so most positions carry no loss. Instead of
projecting every hidden state through the LM head (``batch x length x vocabulary`` logits), the loss
gathers the hidden states of labelled positions first and projects only those, in chunks: each
chunk's fp32 logits are turned into its loss and its gradients at once and freed
(:class:`deltatune.train.fastpath.LinearCrossEntropy`), so logits never exceed one chunk, in forward or
backward.

For a recognised decoder (Llama family) :func:`token_loss` takes the fast path of
:mod:`deltatune.train.fastpath` — unpadded tokens, fused LoRA, hand-written backward — which computes the
same loss; ``fast=False``, or anything that path does not recognise, uses the plain Hugging Face
decoder forward below.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.train.fastpath import fast_token_loss, head_loss
from deltatune.train.update_in_backward import deferred_lookup, deferred_tied_head
from deltatune.data.packing import IGNORE_INDEX
from deltatune.model.forward import hidden_states


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor], fast: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum of token cross-entropies, number of labelled tokens)`` of next-token prediction.

    ``fast`` allows :mod:`deltatune.train.fastpath` (same result, computed faster) where it applies.
    """
    if fast:
        result = fast_token_loss(model, batch)
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
