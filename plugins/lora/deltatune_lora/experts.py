"""LoRA on MoE expert parameters: one low-rank pair per expert, on a 3-D expert weight.

Each expert ``e`` of a parameter holding ``experts`` linear weights ``W_e`` (``out x in``) gets its own
update ``s · B_e A_e``. The pairs are stored as PEFT's ``target_parameters`` LoRA stores them
(``lora.ParamWrapper``), so adapters export to and import from PEFT tensor for tensor: ``lora_A`` is
``(experts·r) x in`` (expert ``e``'s rows at ``e·r .. e·r+r``) and ``lora_B`` is ``out x (r·experts)``
(expert ``e``'s columns at ``e, e+experts, ...``). The forward folds the update into the weight with
one batched product, ``W + s · B A`` per expert, in the weight's dtype (PEFT's ``_LoraFactorsProxy``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.api import ConfigError, ExpertDelta, ExpertShape


class LoraExpertDelta(ExpertDelta):
    """The LoRA pairs of every expert of one 3-D expert parameter."""

    def __init__(self, shape: ExpertShape, r: int, scaling: float) -> None:
        super().__init__()
        width = min(shape.in_features, shape.out_features)
        if r > width:
            raise ConfigError(f"rank r={r} exceeds an expert's width ({shape.out_features}x{shape.in_features}); "
                              f"choose r <= {width}")
        self.shape = shape
        self.r = r
        self.scaling = scaling
        self.lora_A = nn.Linear(shape.in_features, r * shape.experts, bias=False)
        self.lora_B = nn.Linear(r * shape.experts, shape.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)``, batched over experts, with the update ``s · lhs @ rhs`` in the weight's layout."""
        experts = self.shape.experts
        a = self.lora_A.weight.reshape(experts, self.r, -1)  # experts x r x in
        b = self.lora_B.weight.reshape(-1, self.r, experts).permute(2, 0, 1)  # experts x out x r
        return (a.mT, b.mT) if self.shape.transposed else (b, a)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s · B A`` per expert, in ``W``'s dtype (autocast off, as a parametrization keeps the dtype)."""
        lhs, rhs = self.factors()
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` per expert, in fp32."""
        lhs, rhs = self.factors()
        return torch.bmm(lhs.float(), rhs.float()) * self.scaling

    @torch.no_grad()
    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()

    @torch.no_grad()
    def unmerge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight()
