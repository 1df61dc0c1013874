"""BitFit: fine-tune only the bias terms (Ben Zaken et al., 2022, arXiv:2106.10199).

Every weight stays frozen; the biases ``b`` of the targeted linear layers train::

    y = W x + b          (W frozen, b trainable)

That is a tiny number of parameters (one per output channel) and needs no new modules, so there is
nothing to merge: merge and unmerge are no-ops, the biases already live in the base layers. A
wrapped layer's bias is its base layer's (``q_proj.base_layer.bias`` under LoRA), and a quantized
base (``bnb.nn.Linear4bit``) keeps a dense bias too, so BitFit composes with other methods and
quantizers.

Many LLMs (Llama, SmolLM2) have no biases at all. ``add_missing: auto`` (the default) then adds a
zero bias to every targeted layer, so the model's outputs are unchanged before training; on a model
that has biases it trains those only. ``always`` also adds biases where some are missing, ``never``
adds none. What was done is logged and printed (biases added vs existing).

PEFT has no BitFit type, but ``bias: "all"`` on a LoRA/DoRA/VeRA adapter trains and saves every
existing bias: LoRA + BitFit on a model that has biases exports to PEFT that way. Biases BitFit
added do not exist in the PEFT base model, so that export is refused (use the merged export).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import PEFT_PREFIX, TARGETS_HELP, ConfigError, DeltaLinear, console, find_targets, hookimpl

logger = logging.getLogger("deltatune.bitfit")

ADDED_ATTR = "deltatune_bias_added"
"""Set on a linear layer whose bias BitFit created."""


class BitfitConfig(BaseModel):
    """Options of the ``bitfit`` delta method."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | str = Field(
        "all-linear",
        description=f"linear layers whose biases train: {TARGETS_HELP}",
    )
    add_missing: Literal["auto", "always", "never"] = Field(
        "auto",
        description="add zero biases to targeted layers without one: auto = only when none of them has a "
        "bias (a bias-free model), always = wherever missing, never = train existing biases only",
    )


def _base(module: nn.Module) -> nn.Module:
    """The layer that holds the bias: a wrapped layer's base layer, else the layer itself."""
    return module.base_layer if isinstance(module, DeltaLinear) else module


def _owner(name: str) -> str:
    """The linear module a bias parameter name belongs to, seen through ``DeltaLinear`` wrapping."""
    module = name[: -len(".bias")]
    return module[: -len(".base_layer")] if module.endswith(".base_layer") else module


def added_biases(model: nn.Module) -> list[str]:
    """Names of the linear layers whose bias BitFit added."""
    return [name for name, module in model.named_modules() if getattr(module, ADDED_ATTR, False)]


def _add_bias(layer: nn.Module) -> None:
    weight = layer.weight
    dtype = weight.dtype if weight.is_floating_point() and not hasattr(weight, "quant_state") else torch.float32
    layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=dtype, device=weight.device))
    setattr(layer, ADDED_ATTR, True)


def _announce(existing: int, added: int, total: int) -> None:
    message = f"bitfit: training the biases of {total} linear layers ({existing} existing, {added} added as zeros)"
    logger.info(message)
    console.print(f"[bold]{message}[/bold]")


class Bitfit:
    """The ``bitfit`` delta method.

    ``apply`` records the targeted layer names on the instance; :meth:`trainable` and
    :meth:`state_dict` use them (one instance per run, as the core creates it).
    """

    name: ClassVar[str] = "bitfit"
    Config: ClassVar[type[BaseModel]] = BitfitConfig
    supports_quantized: ClassVar[bool] = True

    def __init__(self) -> None:
        self._targets: set[str] = set()

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Make sure every targeted layer has a bias (per ``add_missing``) and remember them."""
        names = find_targets(model, cfg.targets, self.name)
        layers = {name: _base(model.get_submodule(name)) for name in names}
        missing = [name for name, layer in layers.items() if layer.bias is None]
        existing = len(names) - len(missing)
        add = cfg.add_missing == "always" or (cfg.add_missing == "auto" and existing == 0)
        if add:
            for name in missing:
                _add_bias(layers[name])
        trained = [name for name, layer in layers.items() if layer.bias is not None]
        if not trained:
            raise ConfigError(
                f"bitfit: none of the {len(names)} targeted layers has a bias and add_missing is 'never'; "
                "set add_missing: auto (or always) to add zero-initialised biases"
            )
        self._targets = set(trained)
        _announce(existing, len(missing) if add else 0, len(trained))

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Claims the bias of every targeted layer (``<layer>.bias`` or ``<layer>.base_layer.bias``)."""
        return name.endswith(".bias") and ".deltas." not in name and _owner(name) in self._targets

    def merge(self, model: nn.Module) -> None:
        """Nothing to do: the biases already are base-model parameters."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to do (see :meth:`merge`)."""

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained biases, by model key."""
        return {k: v for k, v in model.state_dict().items() if self.trainable(k, v)}

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """PEFT's ``bias: "all"``: a field added to the adapter config of the method PEFT wraps."""
        return {"bias": "all"}

    def peft_state_dict(self, model: nn.Module, cfg: BaseModel) -> dict[str, torch.Tensor]:
        """Every bias of the model under PEFT names, as PEFT's ``bias: "all"`` saves them.

        Raises :class:`ConfigError` when BitFit added biases: the PEFT base model lacks them.
        """
        added = added_biases(model)
        if added:
            raise ConfigError(
                f"bitfit added biases to {len(added)} layers (e.g. {added[0]}) that the base model does not "
                "have, so PEFT cannot load them onto its base model; export with --format merged instead"
            )
        return {
            f"{PEFT_PREFIX}{k}": v for k, v in model.state_dict().items() if k.endswith(".bias") and ".deltas." not in k
        }


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``bitfit``."""
    register(Bitfit)
