"""Bottleneck adapters (Houlsby et al., 2019) with Houlsby or Pfeiffer placement.

An adapter is a small residual bottleneck applied to a sublayer's output ``h``::

    h' = h + up(act(down(dropout(h))))        down: b x d, up: d x b

It sits after the attention output projection and after the MLP output projection (``houlsby``) or
after the MLP output projection only (``pfeiffer``, "AdapterP"). ``up`` starts at zero, so the model
equals its base before training. The adapter transforms the projection's output, so it is a
non-additive delta of the core's delta-layer seam (alone on its layer) and it cannot be merged into a
linear weight (the nonlinearity): only the deltatune adapter bundle holds it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from deltatune.api import ConfigError, Delta, DeltaLinear, LayerDeltaMethod, find_targets, hookimpl, target_matches

ATTENTION_OUTPUTS = ("o_proj", "attn.c_proj", "out_proj", "attention.dense", "self_attention.dense")
"""Name suffixes of attention output projections across families (Llama/Qwen2/Mistral, GPT-2, OPT, ...)."""
MLP_OUTPUTS = ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h", "w2")
"""Name suffixes of MLP output projections across families."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterConfig(BaseModel):
    """Options of the ``adapter`` delta method."""

    model_config = ConfigDict(extra="forbid")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="after attention and MLP outputs (houlsby) or after MLP outputs only (pfeiffer)")
    reduction_factor: int | None = Field(default=None, gt=0, description="bottleneck = hidden size // this")
    bottleneck: int | None = Field(default=None, gt=0, description="bottleneck width (instead of reduction_factor)")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="activation between the down and up projections")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the bottleneck")
    targets: list[str] | None = Field(default=None, description="module names to adapt; default: by placement")

    @model_validator(mode="after")
    def _one_size(self) -> "AdapterConfig":
        if self.reduction_factor is not None and self.bottleneck is not None:
            raise ValueError("give either reduction_factor or bottleneck, not both")
        if self.reduction_factor is None and self.bottleneck is None:
            self.reduction_factor = 16
        return self

    def width(self, features: int) -> int:
        """The bottleneck width for a sublayer of ``features`` outputs."""
        return self.bottleneck or max(1, features // self.reduction_factor)


class BottleneckAdapter(Delta):
    """``h + up(act(down(dropout(h))))`` on a layer's output ``h``; ``up`` starts at zero."""

    additive: ClassVar[bool] = False

    def __init__(self, features: int, width: int, nonlinearity: str, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(features, width)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(width, features)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """The layer output ``result`` plus the bottleneck of it."""
        h = self.dropout(result).to(self.down.weight.dtype)
        return result + self.up(self.act(self.down(h))).to(result.dtype)

    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        raise ConfigError("adapter: a bottleneck adapter is nonlinear and cannot be merged into a linear weight; "
                          "only the deltatune adapter bundle holds it")

    unmerge_weight = merge_weight


class Adapter(LayerDeltaMethod):
    """The ``adapter`` delta method."""

    name: ClassVar[str] = "adapter"
    Config: ClassVar[type[BaseModel]] = AdapterConfig
    supports_quantized: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False  # nonlinear: only the deltatune bundle holds it

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Resolve the placement's targets for this model family, then wrap them."""
        if cfg.targets is None:
            groups = [MLP_OUTPUTS] if cfg.placement == "pfeiffer" else [ATTENTION_OUTPUTS, MLP_OUTPUTS]
            cfg = cfg.model_copy(update={"targets": [family_target(model, group) for group in groups]})
        super().apply(model, cfg)

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """A fresh bottleneck for ``layer``'s output."""
        return BottleneckAdapter(layer.out_features, cfg.width(layer.out_features), cfg.nonlinearity, cfg.dropout)


def family_target(model: nn.Module, suffixes: tuple[str, ...]) -> str:
    """The first of ``suffixes`` that names a linear module of ``model`` (the first suffix when none
    does: targeting it then fails with the core's error naming the modules that exist)."""
    names = find_targets(model, "all-linear", Adapter.name)
    return next((s for s in suffixes if any(target_matches(n, s) for n in names)), suffixes[0])


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``adapter``."""
    register(Adapter)
