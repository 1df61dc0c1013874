"""Scaled activations: a learned vector that rescales the outputs of chosen linear layers.

A third-party deltatune plugin, the template for writing one: it uses only deltatune's public API
(``deltatune.api``) and touches nothing in the core. Each targeted layer gets one vector ``l``
(one scale per output feature) that multiplies what the layer computes::

    y = (W x + b) * l

Every ``l`` starts at 1, so a fresh model computes exactly what the base computes, and only the
vectors train. It is the output-side half of (IA)³ (the first-party ``ia3`` plugin is the full method
with feed-forward input scaling and PEFT export). It works on an NF4 base: it scales activations and
never reads the base weight. Merging folds the scale into the weight rows (and the bias);
unmerging divides it back out (exact up to float rounding as long as no scale is 0). It multiplies
what its layer computes, so it cannot share a layer with another method (``additive = False``).

Usage::

    delta:
      - {name: scaled_activations, config: {targets: [k_proj, v_proj]}}
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import ConfigError, Delta, DeltaLinear, LayerDeltaMethod, hookimpl

__all__ = ["ScaledActivations", "ScaledActivationsConfig", "ScaleDelta"]
__version__ = "0.1.0"


class ScaledActivationsConfig(BaseModel):
    """Options of the ``scaled_activations`` delta method."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | str = Field(
        default_factory=lambda: ["k_proj", "v_proj"],
        description="module-name suffixes, 're:REGEX', or 'all-linear'",
    )


class ScaleDelta(Delta):
    """The learned output scale ``scale`` of one layer."""

    additive: ClassVar[bool] = False

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``result * l`` (``result`` is ``base(x)``: this is the only delta of its layer)."""
        return (result * self.scale.flatten()).to(result.dtype)

    def _scale_bias(self, layer: DeltaLinear, factor: torch.Tensor) -> None:
        bias = layer.base_layer.bias
        if bias is not None:
            with torch.no_grad():
                bias.copy_((bias.float() * factor.flatten()).to(bias.dtype))

    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W * l`` row-wise; the bias is scaled in place."""
        scale = self.scale.detach().float()
        self._scale_bias(layer, scale)
        return weight * scale

    def unmerge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W / l``, and the bias divided back."""
        scale = self.scale.detach().float()
        if bool((scale == 0).any()):
            raise ConfigError("scaled_activations: a learned scale is exactly 0, so the merged weight cannot be unmerged")
        self._scale_bias(layer, 1 / scale)
        return weight / scale


class ScaledActivations(LayerDeltaMethod):
    """The ``scaled_activations`` delta method."""

    name: ClassVar[str] = "scaled_activations"
    Config: ClassVar[type[BaseModel]] = ScaledActivationsConfig
    supports_quantized: ClassVar[bool] = True

    def make_delta(self, layer: DeltaLinear, cfg: ScaledActivationsConfig, layer_name: str) -> ScaleDelta:
        """A vector of ones for ``layer``, on the layer's device."""
        device = next((p.device for p in layer.base_layer.parameters()), torch.device("cpu"))
        return ScaleDelta(layer.out_features).to(device)


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``scaled_activations``."""
    register(ScaledActivations)
