"""LoRA's layer: the delta ``s · B A dropout(x)`` on one linear layer, and its grouped product.

The grouped product (:class:`GroupedLowRank`) is what a fast training forward runs for linear layers
that read the same input (q/k/v, gate/up) when each carries at most one plain LoRA pair: their ``A``
products as one product, their ``B`` products as one with a block-diagonal matrix, and a hand-written
backward that computes only the gradients needed — input, ``A``, ``B``, never the frozen base weight's.
The fp32 ``A``/``B`` (trainable master weights; the optimizer keeps fp32 state) are copied to the
compute dtype (:class:`LowRankCopies`) only when a master may have changed, not at every op.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from deltatune.api import (
    DeltaLinear,
    GroupedProduct,
    LowRankDelta,
    Projection,
    base_input_grad,
    base_products,
    hooked,
    no_autocast,
)


# -- the compute-dtype copies of a group's pairs ---------------------------------------------------------
_GRADIENTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Gradients autograd has accumulated into each LoRA master weight, counted by a hook on the weight."""


def _count_gradient(param: torch.Tensor) -> None:
    _GRADIENTS[param] = _GRADIENTS.get(param, 0) + 1


def gradients_received(param: torch.Tensor) -> int:
    """How many gradients autograd has accumulated into ``param`` since it was first asked about
    (-1 while it does not require a gradient). An optimizer can only change a weight after it got a
    gradient, so this counter moves before any step that changes the weight — also a fused kernel's
    (``torch.optim.AdamW(fused=True)``), which does not bump the weight's version counter. The
    counting hook sits on ``param`` alone: nothing process-wide."""
    count = _GRADIENTS.get(param)
    if count is None:
        if not param.requires_grad:
            return -1
        param.register_post_accumulate_grad_hook(_count_gradient)
        _GRADIENTS[param] = count = 0
    return count


class LowRankCopies:
    """The compute-dtype copies of a group's LoRA pairs — ``A`` stacked (``R x in``) and the scaled
    ``B`` blocks on a block diagonal (``out x R``) — refreshed only when a master weight may have
    changed: its version counter moved or it received a gradient (:func:`gradients_received`).

    The two buffers are allocated once (per dtype and shapes) and refreshed in place, block by
    block; :func:`refresh_copies` refreshes every stale group of a model with three ``foreach``
    calls before the first layer, instead of a concatenation, a block diagonal and two casts per
    group. A graph that saved the buffers and is used again after they were refreshed fails
    autograd's in-place check instead of computing with the new weights."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.shape: tuple | None = None
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    @staticmethod
    def key_of(projections: list[Projection], dtype: torch.dtype) -> tuple:
        """What the copies depend on: dtype, each master's storage, version and gradients received, scalings."""
        deltas = [p.delta for p in projections]
        params = [w for d in deltas if d is not None for w in (d.lora_A.weight, d.lora_B.weight)]
        return (dtype, *((w.data_ptr(), w._version, gradients_received(w)) for w in params),
                *(d.scaling if d is not None else None for d in deltas))

    def stale(self, projections: list[Projection], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(destination, master, scaling)`` for every block to copy when the copies are out of date
        (``[]`` when they are current); the buffers are (re)allocated here when their shapes changed.
        The caller copies, then sets :attr:`key` to :meth:`key_of`."""
        if self.key_of(projections, dtype) == self.key:
            return []
        deltas = [p.delta for p in projections]
        ranks = [d.lora_A.out_features if d is not None else 0 for d in deltas]
        outs = [p.base.out_features for p in projections]
        device = next(d.lora_A.weight.device for d in deltas if d is not None)
        shape = (dtype, device, projections[0].base.in_features, *ranks, *outs)
        if shape != self.shape:
            self.a = torch.empty((sum(ranks), shape[2]), dtype=dtype, device=device)
            self.b = torch.zeros((sum(outs), sum(ranks)), dtype=dtype, device=device)
            self.shape = shape
        blocks = []
        row = col = 0
        for delta, rank, out in zip(deltas, ranks, outs):
            if delta is not None:
                blocks.append((self.a[col:col + rank], delta.lora_A.weight, 1.0))
                blocks.append((self.b[row:row + out, col:col + rank], delta.lora_B.weight, delta.scaling))
                col += rank
            row += out
        return blocks

    def get(self, projections: list[Projection], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A stacked, scaled B block diagonal)`` in ``dtype``, refreshed first when out of date."""
        refresh_copies([(self, projections)], dtype)
        return self.a, self.b


def refresh_copies(groups: list[tuple[LowRankCopies, list[Projection]]], dtype: torch.dtype) -> None:
    """Bring every out-of-date :class:`LowRankCopies` of ``groups`` up to date with its masters:
    ``A`` cast, ``B`` scaled in fp32 then cast (as ``(B.float() * s).to(dtype)``), all at once."""
    stale = [(copies, projections, copies.stale(projections, dtype)) for copies, projections in groups]
    blocks = [block for _, _, group_blocks in stale for block in group_blocks]
    if not blocks:
        return
    with torch.no_grad():
        plain = [(dst, src) for dst, src, scale in blocks if scale == 1.0 and src.dtype == torch.float32]
        scaled = [(dst, src, scale) for dst, src, scale in blocks if not (scale == 1.0 and src.dtype == torch.float32)]
        if plain:
            torch._foreach_copy_([dst for dst, _ in plain], [src for _, src in plain])
        if scaled:
            products = torch._foreach_mul([src.float() for _, src, _ in scaled], [scale for _, _, scale in scaled])
            torch._foreach_copy_([dst for dst, _, _ in scaled], products)
    for copies, projections, group_blocks in stale:
        if group_blocks:
            copies.key = copies.key_of(projections, dtype)


# -- the grouped product ------------------------------------------------------------------------------
class LowRankProduct(torch.autograd.Function):
    """``[x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ]_i`` for linear layers reading the same ``x``, as one
    ``(tokens, Σ out_i)`` tensor. The trainable ``A_i``, ``B_i`` are inputs (fp32 masters are fine:
    their gradients come back in their dtype); the frozen bases get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projections: list[Projection], copies: LowRankCopies,
                *params: torch.Tensor) -> torch.Tensor:
        with no_autocast(x):
            out = base_products(x, projections)
            a_w, b_w = copies.get(projections, x.dtype)
            a = x @ a_w.t()
            out.addmm_(a, b_w.t())
        ctx.save_for_backward(x, a, a_w, b_w)
        ctx.projections = projections
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, a, a_w, b_w = ctx.saved_tensors
        projections: list[Projection] = ctx.projections
        grad = grad.contiguous()
        dx = None
        grads: list[torch.Tensor] = []
        with no_autocast(grad):
            da = grad @ b_w
            if ctx.needs_input_grad[0]:
                dx = base_input_grad(grad, projections).addmm_(da, a_w)
            # one fp32 cast per group; each master's gradient is a view of it (its rows of dA,
            # its block of dB), scaled in fp32 as (dB.float() * s) is
            da_w = (da.t() @ x).float()
            db_w = (grad.t() @ a).float()
            deltas = [(p.delta, p.base.out_features) for p in projections]
            scalings = {d.scaling for d, _ in deltas if d is not None}
            if len(scalings) == 1:
                db_w.mul_(scalings.pop())
            out_start = r_start = 0
            for delta, out in deltas:
                if delta is not None:
                    r_end = r_start + delta.lora_A.out_features
                    db = db_w[out_start:out_start + out, r_start:r_end]
                    if scalings:  # projections with different scalings
                        db.mul_(delta.scaling)
                    grads.append(da_w[r_start:r_end].to(delta.lora_A.weight.dtype))
                    grads.append(db.to(delta.lora_B.weight.dtype))
                    r_start = r_end
                out_start += out
        return (dx, None, None, *grads)


class GroupedLowRank(GroupedProduct):
    """Projections with plain LoRA pairs (some may have none) as one :class:`LowRankProduct`."""

    def __init__(self) -> None:
        self.copies = LowRankCopies()

    @classmethod
    def accepts(cls, delta: Any) -> bool:
        """A LoRA pair whose forward is exactly ``result + s · B A dropout(x)`` with no dropout at work."""
        if not isinstance(delta, LoraDelta) or type(delta).forward is not LoraDelta.forward:
            return False
        if type(delta).lowrank is not LowRankDelta.lowrank:
            return False
        if isinstance(delta.dropout, nn.Dropout) and delta.training and delta.dropout.p > 0:
            return False
        return all(type(m) is nn.Linear and m.bias is None and not hooked(m) for m in (delta.lora_A, delta.lora_B))

    def __call__(self, x: torch.Tensor, projections: list[Projection]) -> torch.Tensor:
        params = [w for p in projections if p.delta is not None for w in (p.delta.lora_A.weight, p.delta.lora_B.weight)]
        return LowRankProduct.apply(x, projections, self.copies, *params)

    @classmethod
    def refresh(cls, groups: list[tuple[GroupedProduct, list[Projection]]], dtype: torch.dtype) -> None:
        """Refresh the compute-dtype copies of every group at once (:func:`refresh_copies`)."""
        refresh_copies([(product.copies, projections) for product, projections in groups], dtype)

    @classmethod
    def kept_per_token(cls, projections: list[Projection]) -> int:
        """The input and the stacked ``A`` output: ``in + Σ r_i``."""
        return projections[0].base.in_features + _rank(projections)

    @classmethod
    def compute_copies(cls, projections: list[Projection]) -> int:
        """``A`` stacked (``R x in``) and the ``B`` block diagonal (``Σ out x R``)."""
        return _rank(projections) * (projections[0].base.in_features + sum(p.base.out_features for p in projections))


def _rank(projections: list[Projection]) -> int:
    return sum(p.delta.lora_A.out_features for p in projections if p.delta is not None)


# -- the delta ---------------------------------------------------------------------------------------------
class LoraDelta(LowRankDelta):
    """One layer's LoRA pair: the additive update ``s · B A dropout(x)``."""

    grouped_product: ClassVar[type[GroupedProduct] | None] = GroupedLowRank

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``result + s · B A dropout(x)``."""
        return result + self.lowrank(self.dropout(x), self.scaling).to(result.dtype)


class ResidualLoraDelta(LoraDelta):
    """A LoRA pair that starts from the base weight (PiSSA, OLoRA: :mod:`deltatune_lora.init`), whose
    base holds the residual: it keeps its starting point ``A₀``, ``B₀`` as buffers, saved with the
    adapter. Its forward is LoRA's."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__(in_features, out_features, r, scaling, dropout)
        self.register_buffer("initial_A", torch.zeros(r, in_features))
        self.register_buffer("initial_B", torch.zeros(out_features, r))
