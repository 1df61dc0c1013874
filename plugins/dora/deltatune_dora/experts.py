"""DoRA on MoE expert parameters: per expert ``e`` of a 3-D expert weight, a LoRA pair and a magnitude::

    W'_e = m_e ⊙ (W_e + s·B_e A_e) / n_e,      n_e = ||W_e + s·B_e A_e||_row     (one norm per output)

as DoRA on the linear layer ``W_e`` (``out x in``) would give, with its conventions: ``m_e`` starts at
``||W_e||_row`` (fp32, of the dequantized weight on a quantized base), ``n_e`` is a constant of the
backward pass (computed without gradient, as the linear layer's), ``s`` is ``alpha / r`` (or
``alpha / sqrt(r)`` with ``rslora``). The pairs are the core's :class:`~deltatune.api.LowRankExpertDelta`
(PEFT's ``ParamWrapper`` layout, as LoRA's); ``magnitude`` (``experts x out``, the linear layer's
name) holds ``m``. The weight is rescaled in its dtype, as the linear layer's output is. The norm is
per output row of each expert whatever the stored layout: an ``in x out`` (``is_transposed``)
weight is read through its transpose. The rescaling (:class:`RowRescale`) keeps only its result for
backward, the effective weight the experts module computes again there, so what stays per MoE layer
is the pairs, the magnitudes and the norms, as for LoRA.

PEFT has no DoRA for expert parameters, so such an adapter has no PEFT form; merging writes
``W'_e`` into the (dequantized) expert weights and keeps ``n_e`` to unmerge.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.api import ConfigError, ExpertShape, LowRankExpertDelta
from deltatune_dora.norm import direction_norm, rescaled, unscaled


class RowRescale(torch.autograd.Function):
    """``W' = combined ⊙ scale`` with ``scale`` one factor per output row (size 1 along dimension ``dim``),
    saving ``W'`` rather than ``combined`` for backward: the scale's gradient is ``rowsum(g ⊙ W') / scale``.
    ``W'`` is the effective expert weight, which the experts module computes again in backward instead
    of keeping it (:class:`deltatune.api.DeltaExperts`), so no dense copy of the experts stays for it."""

    @staticmethod
    def forward(ctx: Any, combined: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
        result = combined * scale
        ctx.save_for_backward(result, scale)
        ctx.dim = dim
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        result, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_combined = grad * scale if needs[0] else None
        grad_scale = (grad * result).sum(dim=ctx.dim, keepdim=True).div_(scale) if needs[1] else None
        return grad_combined, grad_scale, None


class DoraExpertDelta(LowRankExpertDelta):
    """The LoRA pairs and magnitudes of every expert of one 3-D expert parameter."""

    additive: ClassVar[bool] = False

    def __init__(self, shape: ExpertShape, weight: torch.Tensor, r: int, scaling: float) -> None:
        super().__init__(shape, r, scaling)
        rows = self.rows(weight.detach())
        self.magnitude = nn.Parameter(rows.float().norm(dim=-1).to(weight.device))
        self._merged_norm: torch.Tensor | None = None

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (or a tensor of its layout) as ``experts x out x in``, a view."""
        return weight.mT if self.shape.transposed else weight

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``n_e = ||W_e + s·B_e A_e||`` per output (``experts x out``, fp32, no gradient), without
        forming ``B A`` (:func:`~deltatune_dora.norm.direction_norm`)."""
        rows = self.rows(weight)
        a, b = self.pairs()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return direction_norm(rows, a, b, self.scaling, rows.float().square().sum(dim=-1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``(m / n) ⊙ (W + s·B A)`` per expert and output, in ``W``'s dtype."""
        scale = (self.magnitude / self.weight_norm(weight)).to(weight.dtype)
        dim = -2 if self.shape.transposed else -1  # the stored layout's `in` dimension
        return RowRescale.apply(self.updated(weight), scale.unsqueeze(dim), dim)

    @torch.no_grad()
    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``(m / n) ⊙ (W + s·B A)`` (fp32); ``n`` is kept for :meth:`unmerge_weight`."""
        merged, self._merged_norm = rescaled(self.rows(weight + self.delta_weight()), self.magnitude)
        return self.rows(merged)

    @torch.no_grad()
    def unmerge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' ⊙ n / m - s·B A``."""
        if self._merged_norm is None:
            raise ConfigError("dora: unmerge without a preceding merge on these expert weights")
        restored = self.rows(unscaled(self.rows(weight), self._merged_norm, self.magnitude)) - self.delta_weight()
        self._merged_norm = None
        return restored
