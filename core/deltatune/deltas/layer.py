"""The delta-layer seam: a base linear layer plus named deltas, which delta methods hook into.

``DeltaLinear`` replaces an ``nn.Linear`` (or a quantized linear, or a Hugging Face ``Conv1D``: a linear
layer whose weight is stored transposed, ``in x out``, as in GPT-2) in the model. It keeps the original
layer as ``base_layer`` and an ``nn.ModuleDict`` of :class:`Delta` modules keyed by delta-method
name, so parameter names say which method owns them
(``model.layers.0.self_attn.q_proj.deltas.lora.lora_A``). Its forward is::

    result = base_layer(x)
    for delta in deltas (not merged):
        result = delta(x, result, self)

An *additive* delta adds ``f(x)`` to the result (LoRA, VeRA) and composes with other additive deltas
on the same layer; a non-additive one (DoRA rescales the base output) must be the only delta of its
layer. Merging folds a delta into a dense base weight and unmerging takes it out again; base weights
are always read through :func:`base_weight`, which dequantizes a quantized base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import ConfigError

if TYPE_CHECKING:
    from deltatune.deltas.grouped import GroupedProduct

DEQUANTIZE_ATTR = "deltatune_dequantize"


class Delta(nn.Module):
    """One method's change of one linear layer. Subclasses implement the three methods below."""

    additive: ClassVar[bool] = True

    grouped_product: ClassVar[type[GroupedProduct] | None] = None
    """How projections that read one input (q/k/v, gate/up), each with at most one delta of this
    class, are computed as one product by a fast training forward
    (:class:`deltatune.deltas.grouped.GroupedProduct`); ``None``: each layer runs its own forward there."""

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: "DeltaLinear") -> torch.Tensor:
        """The layer output after this delta, given the input ``x`` and the output so far."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor, layer: "DeltaLinear") -> torch.Tensor:
        """The dense weight (fp32, ``out x in``) with this delta folded in."""
        raise NotImplementedError

    def unmerge_weight(self, weight: torch.Tensor, layer: "DeltaLinear") -> torch.Tensor:
        """The inverse of :meth:`merge_weight`."""
        raise NotImplementedError


class WeightUpdateDelta(Delta):
    """A delta whose merged form is a weight update ``ΔW`` that does not depend on ``W`` (LoRA,
    VeRA): subclasses implement :meth:`forward` and :meth:`delta_weight`; merging adds ``ΔW``,
    unmerging subtracts it."""

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` in fp32 (``out x in``)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_weight(self, weight: torch.Tensor, layer: "DeltaLinear") -> torch.Tensor:
        """``W + ΔW``."""
        return weight + self.delta_weight()

    @torch.no_grad()
    def unmerge_weight(self, weight: torch.Tensor, layer: "DeltaLinear") -> torch.Tensor:
        """``W - ΔW``."""
        return weight - self.delta_weight()


class DeltaLinear(nn.Module):
    """A base linear layer (dense or quantized) with named deltas applied on top."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.merged: set[str] = set()
        self.in_features, self.out_features = linear_features(base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight parameter (as stored: may be quantized)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias parameter."""
        return self.base_layer.bias

    @property
    def transposed(self) -> bool:
        """Whether the base layer stores its weight transposed (``in x out``: a ``Conv1D``)."""
        return isinstance(self.base_layer, Conv1D)

    def add_delta(self, key: str, delta: Delta, layer_name: str | None = None) -> None:
        """Attach ``delta`` under the method name ``key``; non-additive deltas must be alone.

        ``layer_name`` (the module's name in the model) only makes the error message precise.
        """
        others = list(self.deltas.keys())
        if key in others:
            raise ConfigError(f"delta method '{key}' is already applied to {layer_name or 'this layer'}")
        if others and (not delta.additive or any(not self.deltas[k].additive for k in others)):
            where = f"module '{layer_name}'" if layer_name else "this layer"
            raise ConfigError(
                f"delta methods '{others[0]}' and '{key}' both change the weight of {where} "
                f"({type(self.base_layer).__name__} {self.out_features}x{self.in_features}) and "
                "cannot be stacked; target different modules"
            )
        self.deltas[key] = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus every unmerged delta."""
        result = self.base_layer(x)
        for key, delta in self.deltas.items():
            if key not in self.merged:
                result = delta(x, result, self)
        return result

    def merge_delta(self, key: str) -> None:
        """Fold delta ``key`` into the base weight (a quantized base becomes dense first)."""
        if key in self.merged:
            return
        if is_quantized(self.base_layer):
            self.base_layer = dense_copy(self.base_layer, getattr(self.base_layer, "compute_dtype", None) or torch.float32)
        self._rewrite_weight(self.deltas[key].merge_weight)
        self.merged.add(key)

    def unmerge_delta(self, key: str) -> None:
        """Take delta ``key`` back out of the base weight."""
        if key not in self.merged:
            return
        self._rewrite_weight(self.deltas[key].unmerge_weight)
        self.merged.discard(key)

    def _rewrite_weight(self, change: Callable[[torch.Tensor, "DeltaLinear"], torch.Tensor]) -> None:
        """Replace the dense base weight ``W`` (``out x in``) by ``change(W, self)``, stored as the
        base layer stores it (transposed for a ``Conv1D``)."""
        weight = self.base_layer.weight
        dense = weight.detach().float()
        changed = change(dense.t() if self.transposed else dense, self)
        with torch.no_grad():
            weight.copy_((changed.t() if self.transposed else changed).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"deltas={list(self.deltas.keys())}, merged={sorted(self.merged)}"


# -- base weights -----------------------------------------------------------------------------
def mark_quantized(module: nn.Module, dequantize: Any) -> None:
    """Record how to dequantize ``module`` (called by the core after a quantizer ran)."""
    setattr(module, DEQUANTIZE_ATTR, dequantize)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer known to the core."""
    return getattr(module, DEQUANTIZE_ATTR, None) is not None


_LINEAR_FORWARDS: dict[type, bool] = {}
"""A model's own ``nn.Linear`` subclass with a forward of its own → whether that forward returns one
tensor of the layer's output width (found once per class, by :func:`_returns_its_output`)."""


def _returns_its_output(module: nn.Module) -> bool:
    """Whether ``module``'s forward maps a row of ``in_features`` to one tensor of ``out_features``."""
    weight = module.weight
    with torch.no_grad():
        try:
            out = module(torch.zeros((1, module.in_features), dtype=weight.dtype, device=weight.device))
        except Exception:  # noqa: BLE001 - a forward that needs more than an input row is no plain linear layer
            return False
    return isinstance(out, torch.Tensor) and out.shape[-1] == module.out_features


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer a delta can wrap: an ``nn.Linear`` (quantized layers such as
    bitsandbytes' subclass it), or a ``Conv1D`` (its weight transposed) — but not a model's own
    ``nn.Linear`` subclass whose forward returns something else than ``x Wᵀ + b``'s tensor (Llama 4's
    router returns scores and logits; Falcon's ``FalconLinear`` does return its output)."""
    if not isinstance(module, (nn.Linear, Conv1D)):
        return False
    cls = type(module)
    if not cls.__module__.startswith("transformers.models.") or cls.forward in (nn.Linear.forward, Conv1D.forward):
        return True
    if cls not in _LINEAR_FORWARDS:
        _LINEAR_FORWARDS[cls] = _returns_its_output(module)
    return _LINEAR_FORWARDS[cls]


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer (a ``Conv1D``'s weight is ``in x out``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def base_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight (``out x in``) a (possibly quantized, possibly wrapped) linear layer computes
    with; a ``Conv1D``'s weight is seen transposed."""
    if isinstance(module, DeltaLinear):
        module = module.base_layer
    dequantize = getattr(module, DEQUANTIZE_ATTR, None)
    if dequantize is not None:
        return dequantize(module)
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def dense_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` computing what ``module`` computes, with a dense ``dtype`` weight."""
    weight = base_weight(module).detach().to(dtype)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, dtype=dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().to(dtype))
    linear.weight.requires_grad_(False)
    return linear



def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute name under it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_linear(model: nn.Module, name: str) -> DeltaLinear:
    """The :class:`DeltaLinear` at ``name``, replacing the plain linear layer there if needed."""
    module = model.get_submodule(name)
    if isinstance(module, DeltaLinear):
        return module
    if not is_linear(module):
        raise ConfigError(f"module '{name}' is a {type(module).__name__}, not a linear layer")
    parent, child = get_submodule_parent(model, name)
    wrapped = DeltaLinear(module)
    setattr(parent, child, wrapped)
    return wrapped


def carrying(model: nn.Module, kind: type[nn.Module], key: str) -> Iterator[tuple[str, Any, nn.Module]]:
    """``(name, wrapper, its deltas of method key)`` for every wrapper of type ``kind`` (a module with
    ``deltas`` keyed by method) that carries a delta of method ``key``."""
    for name, module in model.named_modules():
        if isinstance(module, kind) and key in module.deltas:
            yield name, module, module.deltas[key]


def delta_layers(model: nn.Module, key: str) -> Iterator[tuple[str, DeltaLinear, Delta]]:
    """``(name, layer, delta)`` for every layer that carries a delta of method ``key``."""
    return carrying(model, DeltaLinear, key)


def unwrap(model: nn.Module, kind: type[nn.Module] = DeltaLinear) -> None:
    """Replace every wrapper of type ``kind`` (:class:`DeltaLinear`) by its base layer (after merging, for export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, module.base_layer)



def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether ``param`` holds packed quantized data (never cast or trained)."""
    return not param.is_floating_point() or hasattr(param, "quant_state")
