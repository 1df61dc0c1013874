"""The training loss equals Hugging Face's own causal-LM loss — value and gradients — on a padded
batch with masked prompts, through the plain decoder forward (``fast=False``) and by default (which
takes the fast path on a Llama model: asserted, so a silent fallback cannot pass)."""

from __future__ import annotations

import pytest
import torch

from deltatune.data.packing import IGNORE_INDEX, collate
from deltatune.model.loading import tiny_llama, tiny_tokenizer
from deltatune.testing import fast_forward_runs
from deltatune.train.loss import mean_loss, token_loss

TOLERANCE = 1e-5


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def masked_batch(left_padded: bool = False) -> dict[str, torch.Tensor]:
    """Three rows of different lengths (right padding, as the collator pads, or left padding), prompts
    masked with -100."""
    tokenizer = tiny_tokenizer()
    rows = []
    for prompt, response in [("Question: what is 17 plus 25? Answer:", " 42"),
                             ("Say hi:", " hello there, friend"),
                             ("Colours:", " red, green and blue, then yellow")]:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    batch = collate(rows, tokenizer.pad_token_id)
    if left_padded:  # move each row's padding to its front
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            for key in batch:
                batch[key][i] = batch[key][i].roll(batch[key].shape[1] - n)
        assert (batch["attention_mask"][:, 0] == 0).any()
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == IGNORE_INDEX).any()
    return batch


def hf_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "default"])
def test_token_loss_equals_hugging_face_loss_and_gradients(fast, tied):
    model = tiny_llama(tie_word_embeddings=tied).train()
    batch = masked_batch()
    expected, expected_grads = hf_loss_and_grads(model, batch)

    model.zero_grad()
    if fast:
        with fast_forward_runs() as runs:
            total, count = token_loss(model, batch)
        assert runs, "the fast path did not run: the default fell back to the plain forward"
    else:
        total, count = token_loss(model, batch, fast=False)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert total.dtype == torch.float32
    assert _relative(total.detach() / count, expected) <= TOLERANCE
    (total / count).backward()
    for name, param in model.named_parameters():
        assert _relative(param.grad, expected_grads[name]) <= TOLERANCE, name


def test_plain_token_loss_equals_hugging_face_loss_on_left_padded_rows():
    """Padding before the tokens: only the attention mask keeps real tokens from attending to it."""
    model = tiny_llama().train()
    batch = masked_batch(left_padded=True)
    expected, expected_grads = hf_loss_and_grads(model, batch)
    model.zero_grad()
    total, count = token_loss(model, batch, fast=False)
    assert _relative(total.detach() / count, expected) <= TOLERANCE
    (total / count).backward()
    for name, param in model.named_parameters():
        assert _relative(param.grad, expected_grads[name]) <= TOLERANCE, name


def test_mean_loss_is_the_mean_and_a_batch_without_labels_is_zero():
    model = tiny_llama()
    batch = masked_batch()
    with torch.no_grad():
        total, count = token_loss(model, batch, fast=False)
        assert float(mean_loss(model, batch, fast=False)) == pytest.approx(float(total) / count, rel=1e-6)
        unlabelled = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
        for fast in (False, True):
            zero, none = token_loss(model, unlabelled, fast=fast)
            assert none == 0 and float(zero) == 0.0
            assert float(mean_loss(model, unlabelled, fast=fast)) == 0.0
