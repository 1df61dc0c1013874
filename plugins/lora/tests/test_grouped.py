"""LoRA's grouped product computes what the layers' own forwards compute, and its compute-dtype copies
follow every update of the LoRA weights (the end-to-end check through the families' fast forward is
``plugins/families/tests/test_fast_paths.py``)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from deltatune.deltas.grouped import BaseProducts, ProjectionGroup, grouped_product_class, Projection
from deltatune.deltas.layer import DeltaLinear
from deltatune_lora.layer import GroupedLowRank, LoraDelta


def layers(seed: int = 0) -> list[nn.Module]:
    """q/k/v-like layers reading one input: two with LoRA pairs of different ranks and scalings, one bare."""
    torch.manual_seed(seed)
    out = []
    for out_features, rank, scaling in ((24, 4, 0.5), (8, 0, 0.0), (16, 2, 3.0)):
        base = nn.Linear(32, out_features, bias=out_features == 8).requires_grad_(False)
        if not rank:
            out.append(base)
            continue
        layer = DeltaLinear(base)
        delta = LoraDelta(32, out_features, rank, scaling, 0.0)
        nn.init.normal_(delta.lora_B.weight, std=0.1)
        layer.add_delta("lora", delta)
        out.append(layer)
    return out


def test_grouped_product_equals_the_layers_own_forward_and_gradients():
    modules = layers()
    group = ProjectionGroup(modules)
    grouped = group.grouped(torch.float32)
    assert grouped is not None and isinstance(grouped[0], GroupedLowRank)
    x = torch.randn(10, 32, requires_grad=True)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]

    want = torch.cat([m(x) for m in modules], dim=1)
    want_grads = torch.autograd.grad((want * want).sum(), [x, *params])
    got = group(x, (False, torch.bfloat16))
    got_grads = torch.autograd.grad((got * got).sum(), [x, *params])

    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_only_plain_lora_pairs_are_grouped():
    modules = layers()
    projections = [Projection.of(m) for m in modules]
    assert grouped_product_class(projections) is GroupedLowRank
    assert grouped_product_class([Projection.of(modules[1])]) is BaseProducts  # no delta: the bases alone
    modules[0].deltas["lora"].dropout = nn.Dropout(0.1)  # dropout at work in training: the layer's own forward
    assert grouped_product_class(projections) is None
    modules[0].deltas["lora"].eval()
    assert grouped_product_class(projections) is GroupedLowRank
    modules[2].deltas["lora"].register_forward_hook(lambda *args: None)
    assert grouped_product_class(projections) is None


@pytest.mark.parametrize("optimizer_class", [partial(torch.optim.SGD, lr=0.5, foreach=False),
                                             partial(torch.optim.AdamW, lr=0.05, fused=True)])
def test_copies_follow_every_optimizer_step(optimizer_class):
    """A fused AdamW step changes the weights without bumping their version counters; the copies
    still follow, because the weights received a gradient first."""
    modules = layers()
    group = ProjectionGroup(modules)
    optimizer = optimizer_class([p for m in modules for p in m.parameters() if p.requires_grad])
    x = torch.randn(10, 32)
    for _ in range(3):
        group(x, (False, torch.bfloat16)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            assert torch.allclose(group(x, (False, torch.bfloat16)), torch.cat([m(x) for m in modules], dim=1),
                                  rtol=1e-5, atol=1e-6)


def test_memory_terms_count_the_stacked_pairs():
    projections = [Projection.of(m) for m in layers()]
    assert GroupedLowRank.kept_per_token(projections) == 32 + 4 + 2  # the input and the A outputs
    assert GroupedLowRank.compute_copies(projections) == 6 * 32 + (24 + 8 + 16) * 6  # A stacked, B block diagonal
