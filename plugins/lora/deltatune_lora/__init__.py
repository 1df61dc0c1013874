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
MoE expert parameters (``target_parameters``, transformers 5's 3-D expert weights) get one pair per
expert, as PEFT's ``target_parameters`` (:mod:`deltatune_lora.experts`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from deltatune.api import (LOW_RANK_PEFT_FIELDS, Delta, DeltaExperts, DeltaLinear, ExpertDelta, LayerDeltaMethod,
                           LowRankConfig, hookimpl)
from deltatune_lora.experts import LoraExpertDelta
from deltatune_lora.layer import LoraDelta


class LoraConfig(LowRankConfig):
    """Options of the ``lora`` delta method (``r``, ``alpha``, ``dropout``, ``targets``, ``rslora``,
    ``init_from``: see :class:`deltatune.api.LowRankConfig`; and LoRA+'s ``loraplus_lr_ratio``)."""

    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B trains at the optimizer's learning rate times this ratio (the paper "
        "suggests 16); unset: A and B share the learning rate")


class Lora(LayerDeltaMethod):
    """The ``lora`` delta method."""

    name: ClassVar[str] = "lora"
    Config: ClassVar[type[BaseModel]] = LoraConfig
    supports_quantized: ClassVar[bool] = True
    peft_fields: ClassVar[dict[str, str]] = LOW_RANK_PEFT_FIELDS  # options init_from adopts from a PEFT adapter
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "LORA", "use_dora": False}

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """A fresh LoRA pair for ``layer``."""
        return LoraDelta(layer.in_features, layer.out_features, cfg.r, cfg.scaling, cfg.dropout)

    def make_expert_delta(self, layer: DeltaExperts, param_name: str, cfg: BaseModel, layer_name: str) -> ExpertDelta:
        """Fresh LoRA pairs for every expert of ``param_name``."""
        return LoraExpertDelta(layer.shape(param_name), cfg.r, cfg.scaling)

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """PEFT ``LoraConfig`` fields equivalent to ``cfg``."""
        return cfg.peft_fields()

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
