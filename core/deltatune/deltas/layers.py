"""The shared wrapper that delta methods hook into: a base linear layer plus named deltas.

``DeltaLinear`` replaces an ``nn.Linear`` (or a quantized linear) in the model. It keeps the original
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

import math
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.errors import ConfigError

DEQUANTIZE_ATTR = "deltatune_dequantize"


class Delta(nn.Module):
    """One method's change of one linear layer. Subclasses implement the three methods below."""

    additive: ClassVar[bool] = True

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
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight parameter (as stored: may be quantized)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias parameter."""
        return self.base_layer.bias

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
        weight = self.base_layer.weight
        merged = self.deltas[key].merge_weight(weight.detach().float(), self)
        with torch.no_grad():
            weight.copy_(merged.to(weight.dtype))
        self.merged.add(key)

    def unmerge_delta(self, key: str) -> None:
        """Take delta ``key`` back out of the base weight."""
        if key not in self.merged:
            return
        weight = self.base_layer.weight
        restored = self.deltas[key].unmerge_weight(weight.detach().float(), self)
        with torch.no_grad():
            weight.copy_(restored.to(weight.dtype))
        self.merged.discard(key)

    def extra_repr(self) -> str:
        return f"deltas={list(self.deltas.keys())}, merged={sorted(self.merged)}"


# -- base weights -----------------------------------------------------------------------------
def mark_quantized(module: nn.Module, dequantize: Any) -> None:
    """Record how to dequantize ``module`` (called by the core after a quantizer ran)."""
    setattr(module, DEQUANTIZE_ATTR, dequantize)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer known to the core."""
    return getattr(module, DEQUANTIZE_ATTR, None) is not None


def base_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a (possibly quantized, possibly wrapped) linear layer computes with."""
    if isinstance(module, DeltaLinear):
        module = module.base_layer
    dequantize = getattr(module, DEQUANTIZE_ATTR, None)
    return dequantize(module) if dequantize is not None else module.weight


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


# -- finding and wrapping layers ------------------------------------------------------------------
def iter_linear(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear layer, seeing wrapped layers as one (the linear layers
    inside deltas, such as LoRA's ``lora_A``, are not model layers and are left out)."""
    for name, module in model.named_modules():
        if ".deltas." in f".{name}.":
            continue
        if isinstance(module, DeltaLinear) or (isinstance(module, nn.Linear) and not name.endswith(".base_layer")):
            yield name, module


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output (LM head) layers, which ``all-linear`` leaves out as PEFT does."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def target_matches(name: str, target: str) -> bool:
    """PEFT-style matching: ``q_proj`` matches any module whose name ends in ``.q_proj``;
    ``re:PATTERN`` is a regular expression matched against the whole module name."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str] | str, method: str) -> list[str]:
    """Names of the linear layers ``targets`` select (``all-linear``: all but the LM head).

    Raises :class:`ConfigError` naming the method and listing existing module names when a target
    matches nothing.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    linear = [name for name, _ in iter_linear(model)]
    if targets == ["all-linear"]:
        heads = output_layer_names(model)
        return [name for name in linear if name not in heads]
    chosen: list[str] = []
    for target in targets:
        try:
            hits = [name for name in linear if target_matches(name, target)]
        except re.error as exc:
            raise ConfigError(f"{method}: target '{target}' is not a valid regular expression ({exc})") from None
        if not hits:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(
                f"{method}: target '{target}' matches no linear module. Linear modules here end in: "
                f"{', '.join(suffixes[:12])}; e.g. {', '.join(linear[:3])}"
            )
        chosen += [hit for hit in hits if hit not in chosen]
    return chosen


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute name under it."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_linear(model: nn.Module, name: str) -> DeltaLinear:
    """The :class:`DeltaLinear` at ``name``, replacing the plain linear layer there if needed."""
    module = model.get_submodule(name)
    if isinstance(module, DeltaLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"module '{name}' is a {type(module).__name__}, not a linear layer")
    parent, child = get_submodule_parent(model, name)
    wrapped = DeltaLinear(module)
    setattr(parent, child, wrapped)
    return wrapped


def delta_layers(model: nn.Module, key: str) -> Iterator[tuple[str, DeltaLinear, Delta]]:
    """``(name, layer, delta)`` for every layer that carries a delta of method ``key``."""
    for name, module in model.named_modules():
        if isinstance(module, DeltaLinear) and key in module.deltas:
            yield name, module, module.deltas[key]


def unwrap(model: nn.Module) -> None:
    """Replace every :class:`DeltaLinear` by its base layer (after merging, for export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DeltaLinear):
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, module.base_layer)


class LayerDeltaMethod:
    """Shared implementation for delta methods built from :class:`Delta` modules on linear layers.

    A subclass sets ``name`` and ``Config`` and implements :meth:`make_delta`; targets come from
    ``cfg.targets``. Everything else of the :class:`~deltatune.plugin.protocols.DeltaMethod` protocol —
    claiming parameters, merge, unmerge, state dict — is done here once.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    supports_quantized: ClassVar[bool] = True

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """The delta module for one wrapped layer."""
        raise NotImplementedError

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

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Claims every parameter under ``.deltas.<name>.``."""
        return f".deltas.{self.name}." in name

    def merge(self, model: nn.Module) -> None:
        """Merge this method's delta into every layer it sits on."""
        for _, layer, _ in delta_layers(model, self.name):
            layer.merge_delta(self.name)

    def unmerge(self, model: nn.Module) -> None:
        """Unmerge this method's delta from every layer it sits on."""
        for _, layer, _ in delta_layers(model, self.name):
            layer.unmerge_delta(self.name)

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
        return state

    def load_peft_state_dict(self, model: nn.Module, cfg: BaseModel, state: dict[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors into this method's deltas; every expected key must be present
        with its shape (:class:`ConfigError` otherwise). Keys this method does not own are ignored."""
        copy_named_tensors(self.peft_state_dict(model, cfg), state, self.name)


PEFT_PREFIX = "base_model.model."
"""Prefix of a PEFT checkpoint's per-module keys (``base_model.model.<module name>.lora_A.weight``)."""


def copy_named_tensors(targets: dict[str, torch.Tensor], source: dict[str, torch.Tensor], owner: str) -> None:
    """Copy ``source[k]`` into ``targets[k]`` for every key of ``targets`` (casting dtype).

    Raises :class:`ConfigError` naming ``owner`` when keys are missing from ``source`` or shapes differ.
    """
    missing = sorted(set(targets) - set(source))
    if missing:
        raise ConfigError(
            f"{owner}: the PEFT adapter lacks {len(missing)} tensor(s) this model needs, e.g. {missing[:3]}; "
            "its target modules or method differ from the configuration"
        )
    for key, target in targets.items():
        value = source[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ConfigError(
                f"{owner}: PEFT tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(target.shape)} "
                "(rank or layer sizes differ)"
            )
        with torch.no_grad():
            target.copy_(value.to(device=target.device, dtype=target.dtype))


# -- the low-rank pair shared by LoRA-style methods ---------------------------------------------------
class LowRankConfig(BaseModel):
    """Options shared by methods built on a low-rank pair ``B A`` (LoRA, DoRA)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the low-rank pair")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module-name suffixes, 're:REGEX', or 'all-linear' (every linear layer but the LM head)",
    )
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised)")
    init_from: str | None = Field(None, description="a PEFT adapter folder to start from")

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
}
"""Our :class:`LowRankConfig` field → PEFT ``LoraConfig`` key."""


class LowRankDelta(WeightUpdateDelta):
    """A trainable pair ``A`` (``r x in``, Kaiming-uniform) and ``B`` (``out x r``, zeros) with
    input dropout and scale ``s``: the additive update ``s · B A dropout(x)`` of LoRA, reused by
    methods that change how it is applied (DoRA). Parameter names are PEFT's (``lora_A.weight``)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        width = min(in_features, out_features)
        if r > width:
            raise ConfigError(f"rank r={r} exceeds the layer's width ({out_features}x{in_features}): a low-rank "
                              f"update of it has rank at most {width}; choose r <= {width} or target other modules")
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

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``result + s · B A dropout(x)``."""
        return result + self.lowrank(self.dropout(x), self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling



def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether ``param`` holds packed quantized data (never cast or trained)."""
    return not param.is_floating_point() or hasattr(param, "quant_state")
