"""Both computations of the fast forward's attention (``deltatune_families.fast.kernels.Attention``) give
Hugging Face's loss and gradients: the score matrices below ``FLASH_MIN_WIDTH``, the flash kernel from
it on. The threshold is lowered here so that tiny rows take the flash branch; each case asserts that
the fast forward ran and which branch computed it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.data.packing import collate, collate_packed, pack_rows
from deltatune.model.assembly import build_model, compute_context, resolve_spec
from deltatune.testing import fast_forward_runs
from deltatune.train.loss import token_loss
from deltatune_families.fast import kernels

LOW_THRESHOLD = 32
"""``FLASH_MIN_WIDTH`` in these tests: rows up to 16 tokens wide take the scores, 48 the flash kernel."""


def lora_model(dtype: str) -> torch.nn.Module:
    """The tiny Llama with LoRA on every linear layer, its ``B`` random (so the adapters act)."""
    spec = resolve_spec({"base": "tiny-llama", "base_dtype": dtype,
                         "delta": [{"name": "lora", "config": {"r": 4, "alpha": 8, "targets": "all-linear"}}]})
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model.train()


def batch_of(lengths: tuple[int, ...], packed: bool = False) -> dict[str, torch.Tensor]:
    """Random rows of ``lengths``, the first half of each masked as prompt."""
    generator = torch.Generator().manual_seed(len(lengths))
    rows = []
    for n in lengths:
        ids = torch.randint(3, 250, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return collate_packed(pack_rows(rows, 64), pad_id=0) if packed else collate(rows, pad_id=0)


def loss_and_grads(model, batch, fast: bool):
    model.zero_grad(set_to_none=True)
    with compute_context(model), fast_forward_runs() as runs:
        total, count = token_loss(model, batch, fast=fast)
    assert runs == (["llama"] if fast else [])
    (total / count).backward()
    return float(total) / count, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def flash_calls(monkeypatch):
    """The threshold lowered to :data:`LOW_THRESHOLD`; yields the list of widths the flash branch computed."""
    calls = []
    flash = kernels._flash_forward

    def counting(q, *args):
        calls.append(q.shape[1])
        return flash(q, *args)

    monkeypatch.setattr(kernels, "FLASH_MIN_WIDTH", LOW_THRESHOLD)
    monkeypatch.setattr(kernels, "_flash_forward", counting)
    return calls


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("lengths, packed, flash", [
    ((7, 12, 5), False, False),
    ((40, 12, 45), False, True),
    ((40, 12, 9), True, True),
], ids=["short: scores", "long: flash", "packed long: flash"])
def test_fp32_both_branches_equal_the_plain_path(flash_calls, lengths, packed, flash):
    model = lora_model("fp32")
    batch = batch_of(lengths, packed)
    plain_loss, plain_grads = loss_and_grads(model, batch, fast=False)
    fast_loss, fast_grads = loss_and_grads(model, batch, fast=True)
    assert bool(flash_calls) == flash and all(width >= LOW_THRESHOLD for width in flash_calls)
    assert abs(fast_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in fast_grads.items():
        assert relative(grad, plain_grads[name]) <= 1e-5, name


def test_bf16_flash_branch_is_as_close_to_fp32_as_the_plain_path(flash_calls):
    """In bf16 the paths round differently; each is within the same bounds of the fp32 result: loss to
    1e-2 relative, every gradient at cosine similarity above 0.99."""
    batch = batch_of((40, 12, 45))
    reference_loss, reference_grads = loss_and_grads(lora_model("fp32"), batch, fast=False)
    for fast in (False, True):
        loss, grads = loss_and_grads(lora_model("bf16"), batch, fast=fast)
        assert abs(loss - reference_loss) < 1e-2 * abs(reference_loss)
        for name, grad in grads.items():
            assert F.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0) > 0.99, name
    assert flash_calls


def test_evaluation_without_grad_takes_the_flash_branch(flash_calls):
    model = lora_model("fp32").eval()
    batch = batch_of((40, 45))
    with torch.no_grad():
        plain = token_loss(model, batch, fast=False)
        with fast_forward_runs() as runs:
            fast = token_loss(model, batch)
    assert runs == ["llama"] and flash_calls
    assert fast[1] == plain[1] and abs(float(fast[0]) - float(plain[0])) <= 1e-5 * abs(float(plain[0]))
