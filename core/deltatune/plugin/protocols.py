"""The five plugin protocols: what a class registered through a hook must provide.

These are structural (``typing.Protocol``): a plugin needs no base class from the core, only the
attributes and methods below. ``deltatune.testing`` checks them with contract tests.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn

Row = dict[str, Any]
"""One tokenised example: ``input_ids`` and ``labels`` (lists of int), optional text fields."""


@runtime_checkable
class DatasetBuilder(Protocol):
    """Turns data files into tokenised rows for one split."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def build(self, cfg: BaseModel, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split`` (``train``/``validation``/``test``), or ``None`` when it has none."""
        ...


@runtime_checkable
class DeltaMethod(Protocol):
    """A parameter-efficient change of the base model (LoRA, DoRA, VeRA, BitFit, …)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    supports_quantized: ClassVar[bool]

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Wrap or mark the targeted modules of ``model`` in place."""
        ...

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Whether this method claims (trains) the parameter called ``name``."""
        ...

    def merge(self, model: nn.Module) -> None:
        """Fold this method's deltas into the base weights (outputs unchanged)."""
        ...

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` exactly (up to float rounding)."""
        ...

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor needed to restore this method on a freshly applied model, by model key."""
        ...

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """The PEFT ``adapter_config.json`` content equivalent to ``cfg``, or ``None`` if PEFT
        cannot express it."""
        ...


@runtime_checkable
class PeftMapping(Protocol):
    """Optional members of a :class:`DeltaMethod` that PEFT can express (checked with ``hasattr``).

    :mod:`deltatune.io.export` uses them to write a PEFT adapter folder (``export_peft``) and to start
    from one (``init_from``). The method keeps its own tensor-name mapping here; the core fills in
    ``target_modules`` and ``base_model_name_or_path`` and checks the PEFT config against
    :meth:`DeltaMethod.peft_config`. :class:`deltatune.deltas.layers.LayerDeltaMethod` implements both
    for methods whose delta tensors carry PEFT's names (override ``peft_names`` to rename).
    """

    def peft_state_dict(self, model: nn.Module, cfg: BaseModel) -> dict[str, torch.Tensor]:
        """This method's tensors under PEFT checkpoint names (``base_model.model.<module>.<key>``).

        Raise :class:`deltatune.errors.ConfigError` when this model's state cannot be expressed in
        PEFT (BitFit biases that the base model does not have)."""
        ...

    def load_peft_state_dict(self, model: nn.Module, cfg: BaseModel, state: dict[str, torch.Tensor]) -> None:
        """Copy the tensors of a PEFT checkpoint (``state``, PEFT names) into this method's deltas,
        raising :class:`deltatune.errors.ConfigError` for a missing key or a shape mismatch; keys of
        other methods are ignored."""
        ...


@runtime_checkable
class Quantizer(Protocol):
    """Replaces base layers by quantized ones and gives dense weights back on demand."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def quantize(self, model: nn.Module, cfg: BaseModel) -> None:
        """Quantize the targeted layers of ``model`` in place."""
        ...

    def is_quantized(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer this quantizer produced."""
        ...

    def dequantize_weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight (``out x in``) that ``module`` computes with."""
        ...


@runtime_checkable
class Evaluator(Protocol):
    """Computes metrics of a model on a list of rows."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: BaseModel) -> dict[str, float]:
        """Metrics (flat, float values) of ``model`` on ``rows``."""
        ...


@runtime_checkable
class OptimizerFactory(Protocol):
    """Builds the optimizer (and learning-rate schedule) for the trainable parameters."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def create(
        self, named_params: list[tuple[str, nn.Parameter]], cfg: BaseModel, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer over ``named_params`` and a per-step scheduler (or ``None``)."""
        ...


KINDS: dict[str, type] = {
    "dataset_builder": DatasetBuilder,
    "delta_method": DeltaMethod,
    "quantizer": Quantizer,
    "evaluator": Evaluator,
    "optimizer": OptimizerFactory,
}
"""Plugin kind name → protocol, in the order of the hook specifications."""
