"""The causal-LM loss, computed only where a label exists.

Instruction tuning masks the prompt and the padding, so most positions carry no loss. Instead of
projecting every hidden state through the LM head (``batch x length x vocabulary`` logits), the loss
gathers the hidden states of labelled positions first and projects only those, in chunks
(:func:`deltatune.train.head_loss.head_loss`), so logits never exceed one chunk, in forward or backward.

The head computation must be the model's own logits: :func:`deltatune.model.logits.head_plan` checks
that once per model and supplies the family's logit transform (soft-capping, scaling), applied inside
the chunks. A model for which it is not exact gets its loss from its own logits at the labelled
positions (:func:`deltatune.model.logits.own_forward`, with the auxiliary loss its forward adds to its
own loss, such as a MoE router's), and no fast training forward.

:func:`token_loss` first asks the model-family plugin serving the model for a fast training forward
(one computing the same loss faster, such as the Llama family's on unpadded tokens); ``fast=False``,
a model without one, or a batch it does not take uses the plain Hugging Face decoder forward below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.data.packing import IGNORE_INDEX
from deltatune.model import families
from deltatune.model.forward import hidden_states
from deltatune.model.logits import head_plan, own_forward
from deltatune.train.head_loss import head_loss
from deltatune.train.update_in_backward import deferred_lookup, deferred_tied_head


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor], fast: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum of token cross-entropies, number of labelled tokens)`` of next-token prediction.

    ``fast`` allows the fast training forward of the model's family
    (:func:`deltatune.model.families.family_fast_forward`: same result, computed faster) where it has
    one and it takes the batch.
    """
    plan = head_plan(model)
    forward = families.family_fast_forward(model, plan.family) if fast and plan.exact and plan.transform is None else None
    result = forward(batch) if forward is not None else None
    if result is not None:
        return result
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return next(model.parameters()).new_zeros((), dtype=torch.float32), 0
    if not plan.exact:
        logits, aux = own_forward(model, batch, mask)
        total = F.cross_entropy(logits.float(), labels[mask], reduction="sum")
        if plan.aux_loss_coef and aux is not None:  # the model's loss is its mean plus the weighted auxiliary loss
            total = total + plan.aux_loss_coef * aux.float() * count
        return total, count
    deferred = deferred_tied_head(model)
    with deferred_lookup(model, deferred):
        hidden = hidden_states(model, batch)[:, :-1][mask]
    return head_loss(plan.head, hidden, labels[mask], deferred, plan.transform), count


def mean_loss(model: nn.Module, batch: dict[str, torch.Tensor], fast: bool = True) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens (0 when the batch has none)."""
    total, count = token_loss(model, batch, fast)
    return total / max(count, 1)
