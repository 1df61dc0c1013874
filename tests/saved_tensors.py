"""What autograd keeps for backward in one training forward, measured (for the activation model of
``deltatune estimate``)."""

from __future__ import annotations

import torch

from deltatune.model import loading as models
from deltatune.model.assembly import build_model, compute_context, resolve_spec
from deltatune.train.loss import token_loss


def saved_bytes(spec: dict, batch: int, seq: int, overrides: dict, fast: bool, base=None) -> tuple[int, object]:
    """Bytes of the distinct non-parameter tensors autograd keeps for one training forward (of
    ``tiny_llama(**overrides)``, or of the model ``base``)."""
    resolved = resolve_spec(spec)
    model = build_model(resolved, base if base is not None else models.tiny_llama(**overrides))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = torch.randint(0, 250, (batch, seq), generator=torch.Generator().manual_seed(0))
    batch_ = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), compute_context(model):
        token_loss(model, batch_, fast=fast)
    return sum(seen.values()), resolved
