"""Whether a model honours packed ``position_ids``: a run with packing checks it before training."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.data.packing import collate_packed, pack_rows
from deltatune.model.assembly import compute_context, eval_mode
from deltatune.train.loss import token_loss


def packing_leak(model: nn.Module, vocab: int | None = None) -> float:
    """The largest difference between the losses of two short examples packed together and apart.

    Checks that ``model`` (its attention implementation and ``transformers`` version) honours packed
    ``position_ids``; a run with packing refuses to train when this is not ~0.
    """
    vocab = vocab or model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(vocab, (n,), generator=generator).tolist()} for n in (7, 5)]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    device = next(model.parameters()).device
    packed = collate_packed(pack_rows(rows, 64), 0)
    with eval_mode(model), torch.no_grad(), compute_context(model):
        together, _ = token_loss(model, {k: v.to(device) for k, v in packed.items()})
        apart = sum(float(token_loss(model, {k: v.to(device) for k, v in collate_packed(pack_rows([r], 64), 0)
                                             .items()})[0]) for r in rows)
    return abs(float(together) - apart) / max(abs(apart), 1.0)
