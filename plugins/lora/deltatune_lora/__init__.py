"""LoRA: low-rank adaptation (Hu et al., 2021), and rsLoRA (Kalajdzievski, 2023).

A frozen linear layer ``y = W x + b`` gets a trainable low-rank update::

    y = W x + b + s · B (A (dropout(x)))        A: r x in, B: out x r

``A`` starts Kaiming-uniform (``a = sqrt(5)``) and ``B`` at zero, so the model is unchanged before
training; the scale ``s`` is ``alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``). This matches
Hugging Face PEFT's LoRA layer weight for weight, so adapters export to and import from PEFT.
Merging adds ``s · B A`` to ``W``; unmerging subtracts it. LoRA+ (Hayou et al., 2024;
``loraplus_lr_ratio``, as PEFT's ``create_loraplus_optimizer``) trains ``B`` at the optimizer's
learning rate times the ratio, through the parameter groups any optimizer that honours a delta
method's learning-rate factors builds. The pair is the core's low-rank base
(:class:`deltatune.api.LowRankDelta`, shared with DoRA); LoRA's own forward and the grouped
product a fast training forward runs for layers that read one input are in :mod:`deltatune_lora.layer`.

``init`` chooses how the pair starts (:mod:`deltatune_lora.init`): ``kaiming`` (the default, PEFT's
``init_lora_weights: true``), ``gaussian``, or from the base weight — ``pissa``, ``pissa_niter_N``
(fast randomised SVD) and ``olora`` — with the residual left in the base weight. A pair started from
the base needs a dense base (the residual of a quantized weight would be quantized twice: the run is
refused before weights load; PEFT asks users to decompose in full precision and quantize the
residual themselves), cannot start from a PEFT adapter (``init_from``), and exports to PEFT as the
plain LoRA of rank ``2r`` that gives the trained model on the original base.
MoE expert parameters (``target_parameters``, transformers 5's 3-D expert weights) get one pair per
expert, as PEFT's ``target_parameters`` (the core's :class:`deltatune.api.LowRankExpertDelta`, shared with DoRA).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from deltatune.api import (
    LOW_RANK_PEFT_FIELDS,
    PEFT_PREFIX,
    Delta,
    DeltaExperts,
    DeltaLinear,
    ExpertDelta,
    LayerDeltaMethod,
    LowRankConfig,
    LowRankExpertDelta,
    delta_layers,
    hookimpl,
)
from deltatune_lora.init import INIT_PATTERN, converted_pair, doubled_alpha, gaussian_, start_from_base, starts_from_base
from deltatune_lora.layer import LoraDelta, ResidualLoraDelta


class LoraConfig(LowRankConfig):
    """Options of the ``lora`` delta method (``r``, ``alpha``, ``dropout``, ``targets``, ``rslora``,
    ``init_from``: see :class:`deltatune.api.LowRankConfig`; and LoRA+'s ``loraplus_lr_ratio``)."""

    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B trains at the optimizer's learning rate times this ratio (the paper "
        "suggests 16); unset: A and B share the learning rate")
    init: str = Field(
        "kaiming", pattern=INIT_PATTERN,
        description="how the pair starts: kaiming (A Kaiming-uniform, B zero: PEFT's default), gaussian (A normal, "
        "std 1/r), pissa (principal singular vectors of the base weight), pissa_niter_N (the same by a fast "
        "randomised SVD with N iterations) or olora (QR of the base weight); pissa and olora leave the residual "
        "in the base weight and need a dense base")

    @model_validator(mode="after")
    def _start_once(self) -> "LoraConfig":
        if self.init_from and starts_from_base(self.init):
            raise ValueError(f"init={self.init} derives the pair from the base weight and init_from loads it from a "
                             "PEFT adapter: choose one")
        if self.target_parameters and self.init != "kaiming":
            raise ValueError(f"init={self.init} is for linear layers; expert parameters (target_parameters) start "
                             "as PEFT's do (init=kaiming)")
        return self


class Lora(LayerDeltaMethod):
    """The ``lora`` delta method."""

    name: ClassVar[str] = "lora"
    Config: ClassVar[type[BaseModel]] = LoraConfig
    supports_quantized: ClassVar[bool] = True
    peft_fields: ClassVar[dict[str, str]] = LOW_RANK_PEFT_FIELDS  # options init_from adopts from a PEFT adapter
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "LORA", "use_dora": False}

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """A fresh LoRA pair for ``layer``, started as ``cfg.init`` says (from the base weight for
        PiSSA and OLoRA, whose residual then replaces the base weight)."""
        if starts_from_base(cfg.init):
            delta = ResidualLoraDelta(layer.in_features, layer.out_features, cfg.r, cfg.scaling, cfg.dropout)
            start_from_base(layer, delta, cfg.init)
            return delta
        delta = LoraDelta(layer.in_features, layer.out_features, cfg.r, cfg.scaling, cfg.dropout)
        if cfg.init == "gaussian":
            gaussian_(delta.lora_A.weight, cfg.r)
        return delta

    def dense_base_reason(self, cfg: BaseModel) -> str | None:
        """PiSSA and OLoRA decompose the dense base weight and leave the residual there."""
        if starts_from_base(cfg.init):
            return (f"init={cfg.init} decomposes the dense base weight and leaves the residual in it; use init=kaiming "
                    "on a quantized base, or drop the quantizer")
        return None

    def make_expert_delta(self, layer: DeltaExperts, param_name: str, cfg: BaseModel, layer_name: str) -> ExpertDelta:
        """Fresh LoRA pairs for every expert of ``param_name``."""
        return LowRankExpertDelta(layer.shape(param_name), cfg.r, cfg.scaling)

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """PEFT ``LoraConfig`` fields equivalent to ``cfg``; a pair started from the base exports as
        the plain LoRA of rank ``2r`` with the same scale (:meth:`peft_state_dict`)."""
        fields = cfg.peft_fields()
        if starts_from_base(cfg.init):
            fields.update(r=2 * cfg.r, lora_alpha=doubled_alpha(cfg.alpha, cfg.rslora))
        elif cfg.init == "gaussian":
            fields["init_lora_weights"] = "gaussian"
        return fields

    def peft_state_dict(self, model: nn.Module, cfg: BaseModel) -> dict[str, torch.Tensor]:
        """LoRA's tensors under PEFT names; a pair started from the base as ``[A ; A₀]`` and ``[B | −B₀]``,
        which give the trained model on the original base weight (PEFT's conversion to LoRA)."""
        if not starts_from_base(cfg.init):
            return super().peft_state_dict(model, cfg)
        state: dict[str, torch.Tensor] = {}
        for layer_name, _, delta in delta_layers(model, self.name):
            state[f"{PEFT_PREFIX}{layer_name}.lora_A.weight"], state[f"{PEFT_PREFIX}{layer_name}.lora_B.weight"] = (
                converted_pair(delta))
        return state

    def lr_multipliers(self, cfg: BaseModel) -> dict[str, float]:
        """LoRA+: ``B`` at ``loraplus_lr_ratio`` times the learning rate (nothing without the option)."""
        return {"lora_B.weight": cfg.loraplus_lr_ratio} if cfg.loraplus_lr_ratio else {}

    def inner_width(self, cfg: BaseModel) -> int:
        """The rank: ``A``'s output is kept for backward."""
        return cfg.r


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``lora``."""
    register(Lora)
