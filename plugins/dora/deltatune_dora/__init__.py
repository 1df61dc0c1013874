"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits a frozen weight ``W`` (``out x in``) into a magnitude per output channel and a
direction, adapts the direction with a LoRA pair and trains the magnitude directly::

    W' = m ⊙ (W + s·B A) / n,      n = ||W + s·B A||_row          (one norm per output channel)

``m`` starts at ``||W||_row`` and ``B`` at zero, so the model is unchanged before training. As in
section 4.3 of the paper and in PEFT, ``n`` is a constant of the backward pass (no gradient), so
the layer never needs ``W'``::

    y = W' x + b = (m / n) ⊙ (W x + s·B A x) + b

``W x + b`` is the (possibly quantized) base layer's output, ``B A x`` LoRA's. The only extra work
over LoRA is ``n``. PEFT builds ``W + s·B A`` (``out x in``) on every forward; here::

    n² = ||W||²_row + 2s·rowsum((W Aᵀ) ⊙ B) + s²·rowsum((B (A Aᵀ)) ⊙ B)

``||W||²_row`` is cached (``W`` is frozen; the cache follows the weight tensor's identity and
version), ``W Aᵀ`` is ``out x r`` (one ``out·in·r`` product, the cost of ``B A`` without its
``out x in`` result) and ``A Aᵀ`` is ``r x r``. On a quantized base ``W`` is read through
:func:`deltatune.api.base_weight`. The rescaling is one autograd function (:class:`Rescale`)
that touches the ``tokens x out`` activations as few times as the algebra allows, and ``s`` is
applied to the rank-``r`` intermediate. Merging writes ``(m / n) ⊙ (W + s·B A)`` into ``W`` (``n``
computed directly and kept); unmerging divides the factor out and subtracts ``s·B A``.

Outputs and checkpoints match PEFT's ``LoraConfig(use_dora=True)`` (``magnitude`` is PEFT's
``lora_magnitude_vector``), including its quirk with dropout: while training with dropout the
base output is recomputed from the dropped-out input for the rescaling term. The norm and merge
arithmetic is :mod:`deltatune_dora.norm`, shared with DoRA on MoE expert parameters
(``target_parameters``: :mod:`deltatune_dora.experts`), which PEFT has no form for.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from deltatune.api import (
    LOW_RANK_PEFT_FIELDS,
    ConfigError,
    DeltaExperts,
    DeltaLinear,
    LayerDeltaMethod,
    LowRankConfig,
    LowRankDelta,
    base_weight,
    hookimpl,
)
from deltatune_dora.experts import DoraExpertDelta
from deltatune_dora.norm import direction_norm, rescaled, unscaled


class DoraConfig(LowRankConfig):
    """Options of the ``dora`` delta method (those of LoRA: ``r``, ``alpha``, ``dropout``,
    ``targets``, ``target_parameters``, ``rslora``, ``init_from``)."""


def _weight_key(weight: torch.Tensor) -> tuple[Any, ...]:
    """What identifies the current content of a frozen weight tensor."""
    return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))


class Rescale(torch.autograd.Function):
    """``y = (result + update) ⊙ scale (+ shift)`` per output channel, with the fewest passes over
    the ``tokens x out`` tensors: one add and one multiply forward; backward one multiply for both
    inputs' gradient (they share it) and one multiply-sum for ``scale``'s."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, update: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor | None) -> torch.Tensor:
        combined = torch.add(result, update)
        ctx.save_for_backward(combined, scale)
        ctx.has_shift = shift is not None
        return torch.addcmul(shift, combined, scale) if shift is not None else combined * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        combined, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_in = grad * scale if needs[0] or needs[1] else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_scale = (flat * combined.reshape(flat.shape)).sum(0) if needs[2] else None
        grad_shift = flat.sum(0) if ctx.has_shift and needs[3] else None
        return (grad_in if needs[0] else None, grad_in if needs[1] else None, grad_scale, grad_shift)


class DoraDelta(LowRankDelta):
    """A LoRA pair plus the trainable magnitude ``m`` of one layer."""

    additive: ClassVar[bool] = False

    def __init__(self, layer: DeltaLinear, r: int, scaling: float, dropout: float) -> None:
        super().__init__(layer.in_features, layer.out_features, r, scaling, dropout)
        weight = base_weight(layer).detach()
        self.magnitude = nn.Parameter(weight.float().norm(dim=1).to(weight.device))
        self._sq_norm: torch.Tensor | None = None  # ||W||²_row, fp32, for the weight identified by _sq_key
        self._sq_key: tuple[Any, ...] | None = None
        self._merged_norm: torch.Tensor | None = None

    def base_sq_norm(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``||W||²`` per output channel, recomputed only when the base weight tensor changes."""
        key = _weight_key(layer.base_layer.weight)
        if self._sq_norm is None or self._sq_key != key:
            self._sq_norm = weight.float().square().sum(dim=1)
            self._sq_key = key
        return self._sq_norm

    @torch.no_grad()
    def weight_norm(self, layer: DeltaLinear) -> torch.Tensor:
        """``n = ||W + s·B A||`` per output channel (fp32, no gradient), without forming ``B A``
        (:func:`~deltatune_dora.norm.direction_norm`)."""
        with torch.autocast(layer.base_layer.weight.device.type, enabled=False):
            weight = base_weight(layer)
            return direction_norm(weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                  self.base_sq_norm(weight, layer))

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``(m / n) ⊙ (W x + s·B A x) + b``, as PEFT computes it."""
        scale = self.magnitude / self.weight_norm(layer)
        bias = layer.base_layer.bias
        if self.training and not isinstance(self.dropout, nn.Identity):  # PEFT's dropout path
            x = self.dropout(x)
            base = layer.base_layer(x)
            base = base - bias if bias is not None else base
            update = (scale - 1) * base + scale * self.lowrank(x, self.scaling)
            return (result + update).to(result.dtype)
        # (m/n)(Wx + b + s·BAx) + (1 - m/n) b  ==  (m/n)(Wx + s·BAx) + b
        dtype = result.dtype
        shift = (bias * (1 - scale)).to(dtype) if bias is not None else None
        return Rescale.apply(result, self.lowrank(x, self.scaling).to(dtype), scale.to(dtype), shift)

    @torch.no_grad()
    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``(m / n) ⊙ (W + s·B A)``; ``n`` is kept for :meth:`unmerge_weight`."""
        merged, self._merged_norm = rescaled(weight + self.delta_weight(), self.magnitude)
        return merged

    @torch.no_grad()
    def unmerge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W' ⊙ n / m - s·B A``."""
        if self._merged_norm is None:
            raise ConfigError("dora: unmerge without a preceding merge on this layer")
        restored = unscaled(weight, self._merged_norm, self.magnitude) - self.delta_weight()
        self._merged_norm = None
        return restored


class Dora(LayerDeltaMethod):
    """The ``dora`` delta method."""

    name: ClassVar[str] = "dora"
    Config: ClassVar[type[BaseModel]] = DoraConfig
    supports_quantized: ClassVar[bool] = True
    peft_fields: ClassVar[dict[str, str]] = LOW_RANK_PEFT_FIELDS  # options init_from adopts from a PEFT adapter
    peft_names: ClassVar[dict[str, str]] = {"magnitude": "lora_magnitude_vector"}
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "LORA", "use_dora": True}

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> DoraDelta:
        """A LoRA pair and a magnitude initialised to ``||W||`` per output channel."""
        return DoraDelta(layer, cfg.r, cfg.scaling, cfg.dropout)

    def make_expert_delta(self, layer: DeltaExperts, param_name: str, cfg: BaseModel, layer_name: str) -> DoraExpertDelta:
        """LoRA pairs and magnitudes for every expert of ``param_name``, each magnitude ``||W_e||`` per output."""
        return DoraExpertDelta(layer.shape(param_name), layer.base_weight(param_name), cfg.r, cfg.scaling)

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """PEFT ``LoraConfig(use_dora=True)`` fields equivalent to ``cfg``. DoRA on expert parameters has
        none (PEFT's ``ParamWrapper`` has no DoRA): :class:`ConfigError`."""
        if cfg.target_parameters:
            raise ConfigError("dora on expert parameters (target_parameters) has no PEFT form (PEFT has no DoRA for "
                              "ParamWrapper): only the deltatune adapter bundle and `deltatune export --format merged` "
                              "hold it")
        return {**cfg.peft_fields(), "use_dora": True}

    def inner_width(self, cfg: BaseModel) -> int:
        """The rank: the LoRA pair's ``A`` output is kept for backward."""
        return cfg.r


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``dora``."""
    register(Dora)
