"""Expert weights as delta targets: the counterpart of :class:`~deltatune.deltas.layer.DeltaLinear` for the
3-D weights of mixture-of-experts layers.

Since transformers 5, the experts of a MoE block (Mixtral, Qwen3-MoE, ...) are one module holding each
projection of all experts as one 3-D parameter (``experts.gate_up_proj``: ``experts x 2·inter x hidden``,
``experts.down_proj``), not ``nn.Linear`` layers, so linear-layer targets never reach them. An *expert
parameter* is any 3-D floating-point parameter a module holds directly (found by structure, whatever
the family); its expert slices are linear weights, ``out x in``, or ``in x out`` where the module says
``is_transposed`` (transformers' flag, which PEFT reads too).

:class:`DeltaExperts` replaces such a module in the model, keeps it as ``base_layer`` and holds, per
delta method and per parameter, an :class:`ExpertDelta`. Its forward computes each adapted parameter's
effective weight once (``W`` changed by every unmerged delta) and runs the original module with those
weights in place (``torch.func.functional_call``), so every experts implementation of the module
(eager, batched, grouped) computes with them; gradients flow to the deltas through the weight. This
is PEFT's ``target_parameters`` (``ParamWrapper``) design. Parameter names keep the method name
(``mlp.experts.deltas.<method>.gate_up_proj.<tensor>``), so claiming works as for linear layers. Merged
export unwraps them with :func:`~deltatune.deltas.layer.unwrap` (``kind=DeltaExperts``).

A quantizer quantizes expert parameters through the same wrapper (:meth:`DeltaExperts.set_quantized`):
the dense parameter is dropped and the forward dequantizes it once per call, so QLoRA reaches the
experts too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deltatune.deltas.layer import base_weight, carrying, get_submodule_parent
from deltatune.deltas.targets import target_matches
from deltatune.errors import ConfigError


@dataclass(frozen=True)
class ExpertShape:
    """The layout of one 3-D expert parameter: ``experts`` slices, each a linear weight ``out x in``
    (stored ``in x out`` when ``transposed``)."""

    experts: int
    in_features: int
    out_features: int
    transposed: bool

    @classmethod
    def of(cls, module: nn.Module, param: torch.Tensor) -> ExpertShape:
        """The layout of ``param`` held by the experts module ``module``."""
        transposed = bool(getattr(module, "is_transposed", False))
        experts, first, second = param.shape
        return cls(experts, first, second, True) if transposed else cls(experts, second, first, False)


class ExpertDelta(nn.Module):
    """One method's change of one 3-D expert parameter. Subclasses implement the three methods below,
    on the weight in its stored layout (``experts x ...``, see :class:`ExpertShape`). An *additive*
    one adds to the weight (LoRA) and composes with other additive ones on the same parameter; a
    non-additive one (DoRA rescales) must be its only delta, as on a linear layer."""

    additive: ClassVar[bool] = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the experts compute with after this delta (differentiable in the delta's parameters)."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense fp32 weight with this delta folded in."""
        raise NotImplementedError

    def unmerge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merge_weight`."""
        raise NotImplementedError


class DeltaExperts(nn.Module):
    """An experts module (3-D expert parameters) with named deltas on some of its parameters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.quantized = nn.ModuleDict()
        self.merged: set[str] = set()
        self.expert_params = [name for name, param in base_layer.named_parameters(recurse=False)
                              if param.ndim == 3 and param.is_floating_point()]
        """The 3-D expert parameters, in the order the module holds them (quantized ones included)."""
        self._shapes = {name: ExpertShape.of(base_layer, getattr(base_layer, name)) for name in self.expert_params}

    def shape(self, param_name: str) -> ExpertShape:
        """The layout of the base module's parameter ``param_name``."""
        return self._shapes[param_name]

    def set_quantized(self, param_name: str, quantized: nn.Module) -> None:
        """Hold expert parameter ``param_name`` as ``quantized`` (a quantizer's module, whose
        :func:`~deltatune.deltas.layer.base_weight` is the 3-D weight): the dense parameter is dropped,
        and the forward dequantizes it, in the quantized module's ``compute_dtype``, once per call."""
        delattr(self.base_layer, param_name)
        self.quantized[param_name] = quantized

    def base_weight(self, param_name: str) -> torch.Tensor:
        """The weight ``param_name`` of the base module computes with (dequantized if quantized)."""
        if param_name not in self.quantized:
            return getattr(self.base_layer, param_name)
        quantized = self.quantized[param_name]
        weight = base_weight(quantized)
        return weight.to(getattr(quantized, "compute_dtype", None) or weight.dtype)

    def dequantize(self) -> int:
        """Make every quantized parameter dense again (fp32 for merging and export); returns how many."""
        names = list(self.quantized.keys())
        for param_name in names:
            dense = base_weight(self.quantized[param_name]).detach().float()
            del self.quantized[param_name]
            self.base_layer.register_parameter(param_name, nn.Parameter(dense, requires_grad=False))
        return len(names)

    def add_delta(self, key: str, param_name: str, delta: ExpertDelta, layer_name: str | None = None) -> None:
        """Attach ``delta`` to parameter ``param_name`` under the method name ``key``."""
        per_param = self.deltas[key] if key in self.deltas else nn.ModuleDict()
        if param_name in per_param:
            raise ConfigError(f"delta method '{key}' is already applied to {layer_name or 'this module'}.{param_name}")
        others = [k for k, on in self.deltas.items() if param_name in on]
        if others and (not delta.additive or any(not self.deltas[k][param_name].additive for k in others)):
            raise ConfigError(f"delta methods '{others[0]}' and '{key}' both change the expert parameter "
                              f"'{layer_name or 'this module'}.{param_name}' and cannot be stacked; target different "
                              "parameters")
        per_param[param_name] = delta
        self.deltas[key] = per_param

    def changed(self) -> list[str]:
        """The parameters the forward computes (quantized, or carrying an unmerged delta), in module order."""
        active = {name for key, per_param in self.deltas.items() if key not in self.merged for name in per_param}
        return [name for name in self.expert_params if name in self.quantized or name in active]

    def effective_weight(self, param_name: str) -> torch.Tensor:
        """The weight the experts compute with for ``param_name``: the base weight (dequantized if
        quantized) changed by every unmerged delta on it, in method order."""
        weight = self.base_weight(param_name)
        for key, per_param in self.deltas.items():
            if key not in self.merged and param_name in per_param:
                weight = per_param[param_name](weight)
        return weight

    def forward(self, *args, **kwargs):
        """The experts' output with every unmerged delta applied to their weights.

        The effective weights are as large as the experts themselves, and the experts' products would
        keep them for backward; they are kept as a recipe instead and computed again in backward (as
        bitsandbytes does for a 4-bit weight), so what stays per MoE layer is what the deltas keep
        (a low-rank pair's factors), not a dense copy of every expert. A delta that saves its own
        result for backward (DoRA's rescaling) has it kept as a recipe too."""
        names = self.changed()
        if not names:
            return self.base_layer(*args, **kwargs)
        if not torch.is_grad_enabled():
            weights = {name: self.effective_weight(name) for name in names}
            return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)
        saved = _RecomputedInBackward(self)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            weights = {name: self.effective_weight(name) for name in names}
            saved.recognise(weights)
            return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)

    def merge_delta(self, key: str) -> None:
        """Fold delta ``key`` into the base parameters (quantized ones become dense first)."""
        if key in self.merged:
            return
        self.dequantize()
        for param_name, delta in self.deltas[key].items():
            self._rewrite(param_name, delta.merge_weight)
        self.merged.add(key)

    def unmerge_delta(self, key: str) -> None:
        """Take delta ``key`` back out of the base parameters."""
        if key not in self.merged:
            return
        for param_name, delta in self.deltas[key].items():
            self._rewrite(param_name, delta.unmerge_weight)
        self.merged.discard(key)

    def _rewrite(self, param_name: str, change) -> None:
        weight = getattr(self.base_layer, param_name)
        with torch.no_grad():
            weight.copy_(change(weight.detach().float()).to(weight.dtype))

    def extra_repr(self) -> str:
        deltas = {k: list(v.keys()) for k, v in self.deltas.items()}
        return f"deltas={deltas}, quantized={list(self.quantized.keys())}, merged={sorted(self.merged)}"


@dataclass(frozen=True)
class _Recompute:
    """A saved view of an effective expert weight, to be computed again when backward needs it."""

    param_name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class _Pending:
    """A tensor saved while the effective weights were computed: kept until they are known, then
    replaced by its :class:`_Recompute` if it is a view of one of them."""

    tensor: torch.Tensor | None
    recipe: _Recompute | None = None


class _RecomputedInBackward:
    """Saved-tensor hooks (:meth:`pack`, :meth:`unpack`) for one forward of ``experts``: a saved view of
    an effective weight is kept as a :class:`_Recompute` and the weight computed again (without
    autograd: its own gradient path saved what it needs) the first time backward unpacks one; the
    copy lives while the layer's backward does. Tensors saved before the effective weights are known
    (:meth:`recognise`; the deltas' own, while computing them) wait as :class:`_Pending`."""

    def __init__(self, experts: DeltaExperts) -> None:
        self.experts = experts
        self.storages: dict[int, str] | None = None
        self.pending: list[_Pending] = []
        self.cache: dict[str, torch.Tensor] = {}

    def recognise(self, weights: dict[str, torch.Tensor]) -> None:
        """The effective weights are ``weights``: what was saved of them so far becomes a recipe."""
        self.storages = {weight.untyped_storage().data_ptr(): name for name, weight in weights.items()
                         if weight.is_contiguous() and weight.storage_offset() == 0 and weight.device.type != "meta"}
        for pending in self.pending:
            pending.recipe = self._recipe(pending.tensor)
            if pending.recipe is not None:
                pending.tensor = None
        self.pending = []

    def _recipe(self, tensor: torch.Tensor) -> _Recompute | None:
        name = self.storages.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if name is None:
            return None
        return _Recompute(name, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())

    def pack(self, tensor: torch.Tensor):
        if self.storages is None:
            self.pending.append(_Pending(tensor))
            return self.pending[-1]
        return self._recipe(tensor) or tensor

    def unpack(self, packed):
        if isinstance(packed, _Pending):
            packed = packed.tensor if packed.recipe is None else packed.recipe
        if not isinstance(packed, _Recompute):
            return packed
        if packed.param_name not in self.cache:
            with torch.no_grad():
                self.cache[packed.param_name] = self.experts.effective_weight(packed.param_name)
        return self.cache[packed.param_name].as_strided(packed.size, packed.stride, packed.offset)


def iter_expert_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(module name, parameter name, module)`` for every 3-D floating-point parameter a module of
    ``model`` holds directly (MoE expert weights), a wrapped experts module seen as one."""
    for name, module in model.named_modules():
        if ".deltas." in f".{name}." or ".quantized." in f".{name}." or name.endswith(".base_layer"):
            continue
        if isinstance(module, DeltaExperts):
            for param_name in module.expert_params:
                yield name, param_name, module
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and param.is_floating_point():
                yield name, param_name, module


def find_expert_targets(model: nn.Module, targets: list[str] | str | None, method: str) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` of the expert parameters ``targets`` select, PEFT's
    ``target_parameters`` rules: a parameter name (``experts.gate_up_proj``, ``down_proj``) matches
    every parameter whose full name ends in it, ``re:PATTERN`` matches whole names, and ``all-experts``
    selects every expert parameter. ``None`` or ``[]``: none.

    Raises :class:`ConfigError` naming the method and the expert parameters that exist when a target
    matches nothing.
    """
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    found = [(module_name, param_name) for module_name, param_name, _ in iter_expert_parameters(model)]
    if targets == ["all-experts"] and found:
        return found
    chosen: list[tuple[str, str]] = []
    for target in targets:
        try:
            hits = [hit for hit in found if target_matches(f"{hit[0]}.{hit[1]}", target)]
        except re.error as exc:
            raise ConfigError(f"{method}: target parameter '{target}' is not a valid regular expression ({exc})") from None
        if not hits:
            names = sorted({f"{m.rsplit('.', 1)[-1]}.{p}" for m, p in found})
            have = f"expert parameters here: {', '.join(names)}" if names else "this model has no 3-D expert parameters"
            raise ConfigError(f"{method}: target parameter '{target}' matches no expert parameter; {have}")
        chosen += [hit for hit in hits if hit not in chosen]
    return chosen


def wrap_experts(model: nn.Module, name: str) -> DeltaExperts:
    """The :class:`DeltaExperts` at ``name``, replacing the experts module there if needed."""
    module = model.get_submodule(name)
    if isinstance(module, DeltaExperts):
        return module
    parent, child = get_submodule_parent(model, name)
    wrapped = DeltaExperts(module)
    setattr(parent, child, wrapped)
    return wrapped


def delta_experts(model: nn.Module, key: str) -> Iterator[tuple[str, DeltaExperts, nn.ModuleDict]]:
    """``(name, experts module, {parameter name: delta})`` for every experts module carrying deltas of method ``key``."""
    return carrying(model, DeltaExperts, key)


def peft_expert_names(layer_name: str, layer: DeltaExperts, param_names: list[str]) -> dict[str, str]:
    """Each targeted parameter's PEFT module name: PEFT wraps one parameter per ``ParamWrapper``, nested in
    the order the module holds its parameters, the last one outermost (``experts`` for ``down_proj``,
    ``experts.base_layer`` for ``gate_up_proj`` before it)."""
    order = [name for name in layer.expert_params if name in param_names]
    return {name: layer_name + ".base_layer" * (len(order) - 1 - i) for i, name in enumerate(order)}
