"""The shared implementation of delta methods built from :class:`~deltatune.deltas.layer.Delta`
modules on linear layers (LoRA, DoRA, VeRA, ...): a subclass says how to make one layer's delta,
everything else of the delta-method protocol is done here once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from deltatune.deltas.experts import (DeltaExperts, ExpertDelta, delta_experts, find_expert_targets,
                                     peft_expert_names, wrap_experts)
from deltatune.deltas.layer import Delta, DeltaLinear, delta_layers, wrap_linear
from deltatune.deltas.peft_names import PEFT_PREFIX, copy_named_tensors
from deltatune.deltas.targets import find_targets
from deltatune.errors import ConfigError


class LayerDeltaMethod:
    """Shared implementation for delta methods built from :class:`Delta` modules on linear layers.

    A subclass sets ``name`` and ``Config`` and implements :meth:`make_delta`; targets come from
    ``cfg.targets``. Expert parameters of MoE layers (``cfg.target_parameters``, when the config has
    it) get a delta from :meth:`make_expert_delta`. Everything else of the :class:`~deltatune.plugin.protocols.DeltaMethod` protocol —
    claiming parameters, merge, unmerge, state dict — is done here once.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    supports_quantized: ClassVar[bool] = True

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """The delta module for one wrapped layer."""
        raise NotImplementedError

    def make_expert_delta(self, layer: DeltaExperts, param_name: str, cfg: BaseModel, layer_name: str) -> ExpertDelta:
        """The delta for one 3-D expert parameter; by default the method cannot adapt expert parameters."""
        raise ConfigError(f"delta method '{self.name}' cannot adapt expert parameters (target_parameters); "
                          "adapt them with a method that can, or leave target_parameters unset")

    def prepare(self, model: nn.Module, cfg: BaseModel, layer_names: list[str]) -> None:
        """Hook run once before deltas are made (e.g. VeRA's shared projections). Default: nothing."""

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Wrap every targeted layer and attach this method's delta."""
        names = find_targets(model, cfg.targets, self.name)
        self.prepare(model, cfg, names)
        for layer_name in names:
            layer = wrap_linear(model, layer_name)
            try:
                delta = self.make_delta(layer, cfg, layer_name)
            except ConfigError as exc:
                raise ConfigError(f"{self.name} on module '{layer_name}': {exc}") from None
            layer.add_delta(self.name, delta, layer_name)
        for layer_name, param_name in find_expert_targets(model, getattr(cfg, "target_parameters", None), self.name):
            experts = wrap_experts(model, layer_name)
            try:
                expert_delta = self.make_expert_delta(experts, param_name, cfg, layer_name)
            except ConfigError as exc:
                raise ConfigError(f"{self.name} on parameter '{layer_name}.{param_name}': {exc}") from None
            experts.add_delta(self.name, param_name, expert_delta, layer_name)

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Claims every parameter under ``.deltas.<name>.``."""
        return f".deltas.{self.name}." in name

    def merge(self, model: nn.Module) -> None:
        """Merge this method's delta into every layer it sits on."""
        for _, layer, _ in delta_layers(model, self.name):
            layer.merge_delta(self.name)
        for _, experts, _ in delta_experts(model, self.name):
            experts.merge_delta(self.name)

    def unmerge(self, model: nn.Module) -> None:
        """Unmerge this method's delta from every layer it sits on."""
        for _, layer, _ in delta_layers(model, self.name):
            layer.unmerge_delta(self.name)
        for _, experts, _ in delta_experts(model, self.name):
            experts.unmerge_delta(self.name)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers under ``.deltas.<name>.``."""
        marker = f".deltas.{self.name}."
        return {k: v for k, v in model.state_dict().items() if marker in k}

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """No PEFT equivalent unless a subclass says otherwise."""
        return None

    # -- PEFT tensor names (optional members of :class:`deltatune.plugin.protocols.DeltaMethod`) ----------
    peft_names: ClassVar[dict[str, str]] = {}
    """Tensor key inside this method's :class:`Delta` → PEFT's key suffix; identity when absent
    (LoRA's ``lora_A.weight`` is PEFT's ``lora_A.weight``)."""

    def peft_state_dict(self, model: nn.Module, cfg: BaseModel) -> dict[str, torch.Tensor]:
        """This method's tensors under PEFT checkpoint names
        (``base_model.model.<layer>.<peft key>``); the tensors share storage with the model."""
        state: dict[str, torch.Tensor] = {}
        for layer_name, _, delta in delta_layers(model, self.name):
            for key, tensor in delta.state_dict().items():
                state[f"{PEFT_PREFIX}{layer_name}.{self.peft_names.get(key, key)}"] = tensor
        for layer_name, experts, per_param in delta_experts(model, self.name):
            wrappers = peft_expert_names(layer_name, experts, list(per_param.keys()))
            for param_name, delta in per_param.items():
                for key, tensor in delta.state_dict().items():
                    state[f"{PEFT_PREFIX}{wrappers[param_name]}.{self.peft_names.get(key, key)}"] = tensor
        return state

    def load_peft_state_dict(self, model: nn.Module, cfg: BaseModel, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors into this method's deltas; every expected key must be present
        with its shape (:class:`ConfigError` otherwise). Keys this method does not own are ignored."""
        copy_named_tensors(self.peft_state_dict(model, cfg), state, self.name)
