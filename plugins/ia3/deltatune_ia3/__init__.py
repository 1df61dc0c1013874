"""IA3: infused adapters by inhibiting and amplifying inner activations (Liu et al., 2022).

A first-party deltatune plugin (``examples/third_party_plugin`` is the template for plugins outside
this repository).

IA3 learns one vector per targeted linear layer and multiplies an activation by it, elementwise:

* on attention keys and values (``k_proj``, ``v_proj``) it rescales the layer's **output**::

      y = (W x + b) * l            l: out_features, one scale per output feature

* on the feed-forward block's down projection (``down_proj``, a *feedforward* target) it rescales
  the layer's **input**, the MLP's inner activation::

      y = W (x * l) + b            l: in_features

Every ``l`` starts at 1, so a fresh model computes exactly what the base computes, and only the
vectors train: for a Llama-7B that is about 0.6 M parameters (0.01 %), against 4 M for LoRA r=8 on
``q_proj``/``v_proj``. The vectors have PEFT's shapes and names (``ia3_l``: ``out x 1``, or ``1 x in``
for feedforward layers), so an adapter exports to PEFT's ``IA3`` format and PEFT computes the same
logits. IA3 works on an NF4 base: it scales activations, never reads the base weight.

Merging folds the scale into the weight, ``W * l`` row-wise (output) or column-wise (input) — and the
bias too for output scaling — and unmerging divides it back out (exact up to float rounding as long
as no scale is 0). A merged quantized layer becomes dense (deltatune's :class:`deltatune.DeltaLinear`
does that). IA3 multiplies what its layer computes, so it cannot share a layer with another method
(``additive = False``); LoRA on other layers composes with it.

Cost note: deltatune's wrapper computes ``base(x)`` before any delta; a feedforward IA3 layer needs
``base(x * l)`` instead and computes it again, one extra matmul per ``down_proj`` while training.
Merge the adapter for inference (``deltatune export --format merged``) to drop it.

Left unset, ``targets`` and ``feedforward`` are PEFT's defaults for the base's model family
(:data:`FAMILY_DEFAULTS`, PEFT's ``TRANSFORMERS_MODELS_TO_IA3_*`` tables); a family without one must
name its targets. ``init_from: FOLDER`` starts from a PEFT ``IA3`` adapter.

Usage::

    delta:
      - ia3                                   # PEFT's targets for the family (Llama: k, v, down_proj)
      - {name: ia3, config: {targets: [k_proj, v_proj, down_proj], feedforward: [down_proj]}}
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from deltatune.api import TARGETS_HELP, ConfigError, Delta, DeltaLinear, LayerDeltaMethod, hookimpl, target_matches

__all__ = ["IA3", "IA3Config", "IA3Delta"]
__version__ = "0.1.0"


_ATTENTION_KVD = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_ATTENTION_QVD = (["q_proj", "v_proj", "down_proj"], ["down_proj"])
_FUSED_QKV = (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
FAMILY_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": _ATTENTION_KVD, "mistral": _ATTENTION_KVD, "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": _ATTENTION_QVD, "qwen3": _ATTENTION_QVD, "gemma": _ATTENTION_QVD, "gemma2": _ATTENTION_QVD,
    "falcon": _FUSED_QKV, "gpt_neox": _FUSED_QKV, "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}
"""PEFT's default (targets, feedforward) per ``config.model_type`` (peft.utils.constants)."""


class IA3Config(BaseModel):
    """Options of the ``ia3`` delta method."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | str | None = Field(
        None, description=f"{TARGETS_HELP}; unset: PEFT's default for the model family",
    )
    feedforward: list[str] | None = Field(
        None, description="targets whose input (not output) is scaled: the feed-forward layers; unset: PEFT's "
        "default for the model family when targets is unset too, else none",
    )
    init_from: str | None = Field(None, description="a PEFT IA3 adapter folder to start from")

    @field_validator("feedforward", mode="before")
    @classmethod
    def _peft_regex(cls, value: Any) -> Any:
        """A string is a regular expression over whole module names, as PEFT's ``feedforward_modules``."""
        return [f"re:{value}"] if isinstance(value, str) else value

    def for_model(self, model: nn.Module) -> IA3Config:
        """These options with unset targets/feedforward filled in from :data:`FAMILY_DEFAULTS`."""
        if self.targets is not None:
            return self.model_copy(update={"feedforward": self.feedforward or []})
        family = getattr(getattr(model, "config", None), "model_type", None)
        if family not in FAMILY_DEFAULTS:
            raise ConfigError(f"ia3: no default targets for model family {family!r}; set `targets` "
                              f"(and `feedforward`) — families with defaults: {', '.join(sorted(FAMILY_DEFAULTS))}")
        targets, feedforward = FAMILY_DEFAULTS[family]
        return self.model_copy(update={"targets": targets,
                                       "feedforward": feedforward if self.feedforward is None else self.feedforward})


class IA3Delta(Delta):
    """The learned vector ``ia3_l`` of one layer."""

    additive: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, feedforward: bool) -> None:
        super().__init__()
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones((1, in_features) if feedforward else (out_features, 1)))

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``base(x * l)`` for a feedforward layer, else ``result * l`` (``result`` is ``base(x)``:
        IA3 is the only delta of its layer)."""
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return layer.base_layer((x * scale).to(x.dtype))
        return (result * scale).to(result.dtype)

    def _bias(self, layer: DeltaLinear) -> torch.Tensor | None:
        bias = layer.base_layer.bias
        return None if self.feedforward or bias is None else bias

    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W * l`` (rows, or columns for feedforward layers); an output-scaled bias is scaled in place."""
        bias = self._bias(layer)
        if bias is not None:
            with torch.no_grad():
                bias.copy_((bias.float() * self.ia3_l.detach().float().flatten()).to(bias.dtype))
        return weight * self.ia3_l.detach().float()

    def unmerge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``W / l``, and the bias divided back."""
        scale = self.ia3_l.detach().float()
        if bool((scale == 0).any()):
            raise ConfigError("ia3: a learned scale is exactly 0, so the merged weight cannot be unmerged")
        bias = self._bias(layer)
        if bias is not None:
            with torch.no_grad():
                bias.copy_((bias.float() / scale.flatten()).to(bias.dtype))
        return weight / scale


class IA3(LayerDeltaMethod):
    """The ``ia3`` delta method."""

    name: ClassVar[str] = "ia3"
    Config: ClassVar[type[BaseModel]] = IA3Config
    supports_quantized: ClassVar[bool] = True
    peft_fields: ClassVar[dict[str, str]] = {"targets": "target_modules", "feedforward": "feedforward_modules"}
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "IA3"}

    def apply(self, model: nn.Module, cfg: IA3Config) -> None:
        """Wrap the targeted layers (the family's defaults when ``targets`` is unset)."""
        super().apply(model, cfg.for_model(model))

    def prepare(self, model: nn.Module, cfg: IA3Config, layer_names: list[str]) -> None:
        """Every ``feedforward`` pattern must select at least one targeted layer."""
        for pattern in cfg.feedforward:
            if not any(target_matches(name, pattern) for name in layer_names):
                raise ConfigError(
                    f"ia3: feedforward '{pattern}' matches none of the targeted layers "
                    f"(targets={cfg.targets!r}); add it to targets or remove it"
                )

    def make_delta(self, layer: DeltaLinear, cfg: IA3Config, layer_name: str) -> IA3Delta:
        """A vector of ones for ``layer``, on its input when it is a feedforward target."""
        feedforward = any(target_matches(layer_name, pattern) for pattern in cfg.feedforward)
        delta = IA3Delta(layer.in_features, layer.out_features, feedforward)
        device = next((p.device for p in layer.base_layer.parameters()), torch.device("cpu"))
        return delta.to(device)

    def peft_config(self, cfg: IA3Config) -> dict[str, Any] | None:
        """PEFT ``IA3Config`` fields (``target_modules`` is filled in by the core's exporter; the
        feedforward modules are a regex over the exact names, so the family defaults resolve at export)."""
        feedforward = cfg.feedforward if cfg.targets is not None or cfg.feedforward is not None else \
            sorted({f for _, ffn in FAMILY_DEFAULTS.values() for f in ffn})
        patterns = [p[3:] if p.startswith("re:") else rf"(?:.*\.)?{re.escape(p)}" for p in feedforward]
        return {
            "peft_type": "IA3",
            "feedforward_modules": "|".join(f"(?:{p})" for p in patterns) if patterns else [],
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``ia3``."""
    register(IA3)
