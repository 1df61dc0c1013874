"""LoRA: low-rank adaptation (Hu et al., 2021), and rsLoRA (Kalajdzievski, 2023).

A frozen linear layer ``y = W x + b`` gets a trainable low-rank update::

    y = W x + b + s · B (A (dropout(x)))        A: r x in, B: out x r

``A`` starts Kaiming-uniform (``a = sqrt(5)``) and ``B`` at zero, so the model is unchanged before
training; the scale ``s`` is ``alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``). This matches
Hugging Face PEFT's LoRA layer weight for weight, so adapters export to and import from PEFT.
Merging adds ``s · B A`` to ``W``; unmerging subtracts it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune import Delta, DeltaLinear, LayerDeltaMethod, hookimpl


class LoraConfig(BaseModel):
    """Options of the ``lora`` delta method."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module-name suffixes, 're:REGEX', or 'all-linear' (every linear layer but the LM head)",
    )
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    init_from: str | None = Field(None, description="a PEFT LoRA adapter folder to start from")

    @property
    def scaling(self) -> float:
        """The factor applied to ``B A``."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraDelta(Delta):
    """The trainable pair ``A``, ``B`` of one layer."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``result + s · B A dropout(x)``, computed in the adapter's dtype."""
        dtype = self.lora_A.weight.dtype if not torch.is_autocast_enabled(x.device.type) else x.dtype
        update = self.lora_B(self.lora_A(self.dropout(x.to(dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W + s · B A``."""
        return weight + self.delta_weight()

    def unmerge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W - s · B A``."""
        return weight - self.delta_weight()


class Lora(LayerDeltaMethod):
    """The ``lora`` delta method."""

    name: ClassVar[str] = "lora"
    Config: ClassVar[type[BaseModel]] = LoraConfig
    supports_quantized: ClassVar[bool] = True

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """A fresh LoRA pair for ``layer``."""
        return LoraDelta(layer.in_features, layer.out_features, cfg.r, cfg.scaling, cfg.dropout)

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """PEFT ``LoraConfig`` fields equivalent to ``cfg``."""
        return {
            "peft_type": "LORA",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.rslora,
            "bias": "none",
        }


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``lora``."""
    register(Lora)
