"""The perplexity evaluator batches rows by length; its loss is still every labelled token's mean
cross-entropy over all rows, as batching the rows in their order gives it."""

from __future__ import annotations

import pytest
import torch

from deltatune.api import collate, token_loss
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.plugin.resolve import resolve


def test_rows_batched_by_length_give_the_loss_of_rows_in_their_order():
    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in (60, 6, 41, 9, 33, 12):  # a long row next to a short one: batched in order, it pads the short one
        ids = torch.randint(3, 250, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    model = tiny_llama().eval()
    evaluator = resolve("evaluator", {"name": "perplexity", "config": {"batch_size": 2}})
    metrics = evaluator.plugin.evaluate(model, tokenizer, rows, evaluator.cfg)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 2):
            loss, n = token_loss(model, collate(rows[start:start + 2], tokenizer.pad_token_id))
            total, count = total + float(loss), count + n
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-6)
