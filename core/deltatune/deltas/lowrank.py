"""The low-rank pair ``s · B A`` that LoRA-style methods share (LoRA adds it, DoRA rescales with it):
its options, their PEFT names, the module holding ``A`` and ``B`` of a linear layer
(:class:`LowRankDelta`, each method gives it its own ``forward``) and the one holding a pair per
expert of a 3-D MoE expert parameter (:class:`LowRankExpertDelta`, whose forward is LoRA's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from deltatune.deltas.experts import ExpertDelta, ExpertShape
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


def check_rank(r: int, in_features: int, out_features: int, what: str) -> None:
    """Refuse a rank above both sizes of ``what`` (an ``out x in`` weight). A rank between the two sizes
    only wastes parameters, and PEFT allows it (a 1-wide gate under ``all-linear``)."""
    largest = max(in_features, out_features)
    if r > largest:
        raise ConfigError(f"rank r={r} exceeds both sizes of {what} ({out_features}x{in_features}): a low-rank "
                          f"update of it has rank at most {min(in_features, out_features)}; choose r <= {largest} "
                          "or target other modules")


class LowRankDelta(WeightUpdateDelta):
    """A trainable pair ``A`` (``r x in``, Kaiming-uniform) and ``B`` (``out x r``, zeros) with
    input dropout and scale ``s``, whose merged form is ``ΔW = s · B A``. A method built on it writes
    :meth:`forward` (LoRA adds ``s · B A dropout(x)``; DoRA rescales with it). Parameter names are
    PEFT's (``lora_A.weight``)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        check_rank(r, in_features, out_features, "the layer")
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


class LowRankExpertDelta(ExpertDelta):
    """One low-rank pair per expert of a 3-D expert parameter: expert ``e``'s weight ``W_e`` (``out x in``)
    becomes ``W_e + s · B_e A_e``. The pairs are stored as PEFT's ``target_parameters`` LoRA stores them
    (``lora.ParamWrapper``), so they export to and import from PEFT tensor for tensor: ``lora_A`` is
    ``(experts·r) x in`` (expert ``e``'s rows at ``e·r .. e·r+r``, Kaiming-uniform) and ``lora_B`` is
    ``out x (r·experts)`` (expert ``e``'s columns at ``e, e+experts, ...``, zeros). The forward folds
    the update into the weight with one batched product, in the weight's dtype (PEFT's
    ``_LoraFactorsProxy``); merging adds the update, unmerging subtracts it. A method that changes the
    weight otherwise (DoRA) overrides the three."""

    def __init__(self, shape: ExpertShape, r: int, scaling: float) -> None:
        super().__init__()
        check_rank(r, shape.in_features, shape.out_features, "an expert")
        self.shape = shape
        self.r = r
        self.scaling = scaling
        self.lora_A = nn.Linear(shape.in_features, r * shape.experts, bias=False)
        self.lora_B = nn.Linear(r * shape.experts, shape.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` batched over experts: ``experts x r x in`` and ``experts x out x r`` (views)."""
        experts = self.shape.experts
        a = self.lora_A.weight.reshape(experts, self.r, -1)
        b = self.lora_B.weight.reshape(-1, self.r, experts).permute(2, 0, 1)
        return a, b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)``, batched over experts, with the update ``s · lhs @ rhs`` in the weight's layout."""
        a, b = self.pairs()
        return (a.mT, b.mT) if self.shape.transposed else (b, a)

    def updated(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s · B A`` per expert, in ``W``'s dtype (autocast off, as a parametrization keeps the dtype)."""
        lhs, rhs = self.factors()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=self.scaling)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s · B A`` per expert (:meth:`updated`)."""
        return self.updated(weight)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` per expert, in fp32, in the weight's layout."""
        lhs, rhs = self.factors()
        return torch.bmm(lhs.float(), rhs.float()) * self.scaling

    @torch.no_grad()
    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()

    @torch.no_grad()
    def unmerge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()
