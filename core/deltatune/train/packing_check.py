"""Whether a model honours packed ``position_ids``: a run with packing checks it before training."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.data.packing import IGNORE_INDEX, collate_packed, pack_rows
from deltatune.model.assembly import compute_context, eval_mode, model_dtype
from deltatune.train.loss import token_loss

CONTENT_BOUND = 1e-6
"""Largest relative change of an example's loss when the content of the example packed before it
changes. A model that keeps packed examples apart computes the same numbers either way (same shapes,
masked scores contribute exact zeros), so anything above rounding noise is a leak."""
ALONE_BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 5e-3}
"""Largest relative difference of an example's loss packed after another from its loss alone, by
compute dtype (other shapes, so the rounding differs; bf16 rounds coarsely)."""


def packing_problem(model: nn.Module, vocab: int | None = None) -> str | None:
    """Why packing is unsafe with ``model`` — the loss of a packed example depends on the example packed
    before it (attention across examples: ALiBi, state-space or sink models, positions taken from
    elsewhere than ``position_ids``) — or ``None`` when packed examples stay apart.

    Measures the loss of one example (its labels only) packed after each of two different examples of
    the same length, and alone; the model's attention implementation and ``transformers`` version are
    what decide it.
    """
    vocab = vocab or model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first_a, first_b, second = (torch.randint(vocab, (12,), generator=generator).tolist() for _ in range(3))
    device = next(model.parameters()).device

    def loss(rows: list[list[int]]) -> float:
        labelled = [{"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)} for ids in rows[:-1]]
        labelled.append({"input_ids": rows[-1], "labels": list(rows[-1])})
        batch = collate_packed(pack_rows(labelled, 64), 0)
        with eval_mode(model), torch.no_grad(), compute_context(model):
            return float(token_loss(model, {k: v.to(device) for k, v in batch.items()})[0])

    after_a, after_b, alone = loss([first_a, second]), loss([first_b, second]), loss([second])
    scale = max(abs(alone), 1.0)
    if (content := abs(after_a - after_b) / scale) > CONTENT_BOUND:
        return (f"an example's loss changes with the example packed before it (relative {content:.2e}): this model's "
                "attention crosses packed examples")
    if (apart := abs(after_a - alone) / scale) > ALONE_BOUNDS.get(model_dtype(model), ALONE_BOUNDS[torch.bfloat16]):
        return f"an example's loss packed after another differs from its loss alone (relative {apart:.2e})"
    return None
