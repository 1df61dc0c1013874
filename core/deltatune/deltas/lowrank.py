"""The low-rank pair ``s · B A`` that LoRA-style methods share (LoRA adds it, DoRA rescales with it):
its options, their PEFT names and the module holding ``A`` and ``B``. Each method gives it its own
``forward``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from deltatune.deltas.layer import WeightUpdateDelta
from deltatune.deltas.targets import TARGETS_HELP
from deltatune.errors import ConfigError


class LowRankConfig(BaseModel):
    """Options shared by methods built on a low-rank pair ``B A`` (LoRA, DoRA)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the low-rank pair")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description=TARGETS_HELP,
    )
    target_parameters: list[str] | str | None = Field(
        None, description="MoE expert parameters (3-D, transformers 5) to adapt too, as PEFT's target_parameters: "
        "parameter-name suffixes (experts.gate_up_proj), 're:REGEX', or 'all-experts'")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised)")
    init_from: str | None = Field(None, description="a PEFT adapter folder to start from")

    @model_validator(mode="after")
    def _no_dropout_on_experts(self) -> LowRankConfig:
        if self.target_parameters and self.dropout > 0:
            raise ValueError("dropout must be 0 with target_parameters: an expert parameter is adapted in its "
                             "weight, where the input's dropout cannot be applied (as in PEFT)")
        return self

    @property
    def scaling(self) -> float:
        """The factor ``s`` applied to ``B A``."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def peft_fields(self) -> dict[str, Any]:
        """The PEFT ``LoraConfig`` fields these options correspond to (targets are filled in by
        the exporter from the layers actually wrapped)."""
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "use_rslora": self.rslora, "bias": "none"}


LOW_RANK_PEFT_FIELDS: dict[str, str] = {
    "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora", "targets": "target_modules",
    "target_parameters": "target_parameters",
}
"""Our :class:`LowRankConfig` field → PEFT ``LoraConfig`` key."""


class LowRankDelta(WeightUpdateDelta):
    """A trainable pair ``A`` (``r x in``, Kaiming-uniform) and ``B`` (``out x r``, zeros) with
    input dropout and scale ``s``, whose merged form is ``ΔW = s · B A``. A method built on it writes
    :meth:`forward` (LoRA adds ``s · B A dropout(x)``; DoRA rescales with it). Parameter names are
    PEFT's (``lora_A.weight``)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        largest = max(in_features, out_features)
        if r > largest:  # a rank between the two sizes only wastes parameters, as PEFT allows (a 1-wide gate)
            raise ConfigError(f"rank r={r} exceeds both sizes of the layer ({out_features}x{in_features}): a low-rank "
                              f"update of it has rank at most {min(in_features, out_features)}; choose r <= {largest} "
                              "or target other modules")
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the pair multiplies in: the input's under autocast, else the adapter's."""
        return x.dtype if torch.is_autocast_enabled(x.device.type) else self.lora_A.weight.dtype

    def lowrank(self, x: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
        """``scaling · B A x`` (no dropout) in :meth:`compute_dtype`. The scale multiplies the
        output, in PEFT's order of operations, so results agree with PEFT to the last bits."""
        update = self.lora_B(self.lora_A(x.to(self.compute_dtype(x))))
        return update * scaling if scaling != 1.0 else update

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
