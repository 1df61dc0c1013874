"""Bottleneck adapters: Houlsby (Houlsby et al., 2019), Pfeiffer and parallel (He et al., 2022) placement.

A sequential adapter is a small residual bottleneck applied to a sublayer's output ``h``::

    h' = h + up(act(down(dropout(h))))        down: b x d, up: d x b

It sits after the attention output projection and after the MLP output projection (``houlsby``) or
after the MLP output projection only (``pfeiffer``, "AdapterP"). It transforms the projection's
output, so it is a non-additive delta of the core's delta-layer seam (alone on its layer).

A parallel adapter (``parallel``) reads the sublayer's *input* ``x`` and adds its scaled bottleneck
beside the sublayer::

    y = sublayer(x) + s · up(act(down(dropout(x))))

beside the MLP (the default, He et al.'s best placement) and/or the attention (``beside``), with scale
``s`` (``scale``, 4 as in the paper). It is a forward hook on the sublayer module (the MLP, the
attention), whose bottleneck sits under ``<sublayer>.deltas.adapter``; a fast training forward that
would skip the hook declines such a model and the exact generic path runs.

``up`` starts at zero, so the model equals its base before training. No placement can be merged into
a linear weight (the nonlinearity): only the deltatune adapter bundle holds an adapter.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from deltatune.api import (
    ConfigError,
    Delta,
    DeltaLinear,
    LayerDeltaMethod,
    find_targets,
    hookimpl,
    target_matches,
)

ATTENTION_OUTPUTS = ("o_proj", "attn.c_proj", "out_proj", "attention.dense", "self_attention.dense")
"""Name suffixes of attention output projections across families (Llama/Qwen2/Mistral, GPT-2, OPT, ...)."""
MLP_OUTPUTS = ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h", "w2")
"""Name suffixes of MLP output projections across families."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
NOT_MERGEABLE = ("adapter: a bottleneck adapter is nonlinear and cannot be merged into a linear weight; "
                 "only the deltatune adapter bundle holds it")


class AdapterConfig(BaseModel):
    """Options of the ``adapter`` delta method."""

    model_config = ConfigDict(extra="forbid")
    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "houlsby", description="after attention and MLP outputs (houlsby), after MLP outputs only (pfeiffer), "
        "or beside the sublayers chosen by `beside` (parallel)")
    reduction_factor: int | None = Field(default=None, gt=0, description="bottleneck = hidden size // this")
    bottleneck: int | None = Field(default=None, gt=0, description="bottleneck width (instead of reduction_factor)")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="activation between the down and up projections")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the bottleneck")
    targets: list[str] | None = Field(default=None, description="module names to adapt; default: by placement "
                                      "(houlsby, pfeiffer; parallel chooses its sublayers with `beside`)")
    beside: list[Literal["mlp", "attention"]] | None = Field(
        default=None, min_length=1, description="parallel placement: the sublayers the adapter runs beside "
        "(default: mlp)")
    scale: float | None = Field(default=None, gt=0, description="parallel placement: the factor s of the "
                                "bottleneck's output (default: 4)")

    @model_validator(mode="after")
    def _one_size(self) -> "AdapterConfig":
        parallel_only = [k for k in ("beside", "scale") if getattr(self, k) is not None]
        if self.placement != "parallel" and parallel_only:
            raise ValueError(f"{' and '.join(parallel_only)} apply to placement: parallel only")
        if self.placement == "parallel":
            if self.targets is not None:
                raise ValueError("placement: parallel sits beside whole sublayers, chosen with `beside` "
                                 "(mlp, attention), not beside linear `targets`")
            self.beside = self.beside or ["mlp"]
            self.scale = self.scale or 4.0
        if self.reduction_factor is not None and self.bottleneck is not None:
            raise ValueError("give either reduction_factor or bottleneck, not both")
        if self.reduction_factor is None and self.bottleneck is None:
            self.reduction_factor = 16
        return self

    def width(self, features: int) -> int:
        """The bottleneck width for a sublayer of ``features`` outputs."""
        return self.bottleneck or max(1, features // self.reduction_factor)


def add_bottleneck(module: nn.Module, features: int, width: int, nonlinearity: str, dropout: float) -> None:
    """Give ``module`` the bottleneck's layers ``down`` (``features`` → ``width``), ``act``, ``up`` (zero at
    start) and ``dropout``, under the names every placement's saved adapters use."""
    module.down = nn.Linear(features, width)
    module.act = ACTIVATIONS[nonlinearity]()
    module.up = nn.Linear(width, features)
    module.dropout = nn.Dropout(dropout)
    nn.init.zeros_(module.up.weight)
    nn.init.zeros_(module.up.bias)


class BottleneckAdapter(Delta):
    """``h + up(act(down(dropout(h))))`` on a layer's output ``h``; ``up`` starts at zero."""

    additive: ClassVar[bool] = False

    def __init__(self, features: int, width: int, nonlinearity: str, dropout: float) -> None:
        super().__init__()
        add_bottleneck(self, features, width, nonlinearity, dropout)

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """The layer output ``result`` plus the bottleneck of it."""
        h = self.dropout(result).to(self.down.weight.dtype)
        return result + self.up(self.act(self.down(h))).to(result.dtype)

    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        raise ConfigError(NOT_MERGEABLE)

    unmerge_weight = merge_weight


class ParallelAdapter(nn.Module):
    """``s · up(act(down(dropout(x))))`` of a sublayer's input ``x``, added to its output by
    :class:`AddBeside`; ``up`` starts at zero."""

    def __init__(self, features: int, width: int, nonlinearity: str, dropout: float, scale: float) -> None:
        super().__init__()
        add_bottleneck(self, features, width, nonlinearity, dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled bottleneck of ``x``, in the adapter's dtype."""
        return self.up(self.act(self.down(self.dropout(x.to(self.down.weight.dtype))))) * self.scale


class AddBeside:
    """A forward hook (with keyword arguments) that adds a :class:`ParallelAdapter` of the sublayer's
    input (``hidden_states``, by keyword or first) to its output (a tensor, or a tuple whose first
    element is the output, as attention modules return)."""

    def __init__(self, adapter: ParallelAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if isinstance(output, tuple):
            return (output[0] + self.adapter(x).to(output[0].dtype), *output[1:])
        return output + self.adapter(x).to(output.dtype)


class Adapter(LayerDeltaMethod):
    """The ``adapter`` delta method."""

    name: ClassVar[str] = "adapter"
    Config: ClassVar[type[BaseModel]] = AdapterConfig
    supports_quantized: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False  # nonlinear: only the deltatune bundle holds it

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Resolve the placement's targets for this model family, then wrap them (sequential
        placements) or hook the sublayers beside them (parallel)."""
        if cfg.placement == "parallel":
            hidden = model.get_input_embeddings().embedding_dim
            for name in parallel_sublayers(model, cfg.beside):
                add_parallel_adapter(model.get_submodule(name), name, hidden, cfg)
            return
        if cfg.targets is None:
            groups = [MLP_OUTPUTS] if cfg.placement == "pfeiffer" else [ATTENTION_OUTPUTS, MLP_OUTPUTS]
            cfg = cfg.model_copy(update={"targets": [family_target(model, group) for group in groups]})
        super().apply(model, cfg)

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> Delta:
        """A fresh bottleneck for ``layer``'s output."""
        return BottleneckAdapter(layer.out_features, cfg.width(layer.out_features), cfg.nonlinearity, cfg.dropout)

    def merge(self, model: nn.Module) -> None:
        """Refused: no placement of a bottleneck adapter is linear."""
        raise ConfigError(NOT_MERGEABLE)

    unmerge = merge


def parallel_sublayers(model: nn.Module, beside: list[str]) -> list[str]:
    """The sublayer modules (the MLPs, the attentions) of every decoder layer that hold the family's
    output projection of each sublayer in ``beside``: the decoder layer's child on the projection's
    path (a mixture of experts' whole MLP, not one expert). A family whose decoder layer computes the
    sublayer inline (its projection a direct child of the layer) is refused."""
    outputs = {"mlp": MLP_OUTPUTS, "attention": ATTENTION_OUTPUTS}
    blocks = decoder_layers(model)
    linear = find_targets(model, "all-linear", Adapter.name)
    chosen: list[str] = []
    for sublayer in beside:
        suffix = family_target(model, outputs[sublayer])
        paths = sorted({f"{block}.{n[len(block) + 1:].split('.')[0]}"
                        for n in linear if target_matches(n, suffix) for block in blocks if n.startswith(block + ".")})
        if not paths:
            raise ConfigError(f"adapter: placement parallel finds no {sublayer} here (no linear module of a decoder "
                              f"layer ends in {' or '.join(outputs[sublayer])})")
        inline = [p for p in paths if p in linear]
        if inline:
            raise ConfigError(f"adapter: the {sublayer} of {type(model).__name__} is not a module of its own ({inline[0]} "
                              "is a direct child of its decoder layer), so placement parallel cannot run beside it; "
                              "use placement houlsby or pfeiffer")
        chosen += paths
    return chosen


def decoder_layers(model: nn.Module) -> list[str]:
    """Names of the decoder layers: the elements of the outermost ``nn.ModuleList`` of the model."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return [f"{name}.{i}" for i in range(len(module))]
    raise ConfigError(f"adapter: {type(model).__name__} has no list of decoder layers for placement parallel")


def add_parallel_adapter(sublayer: nn.Module, name: str, hidden: int, cfg: BaseModel) -> None:
    """Put a :class:`ParallelAdapter` (``hidden`` wide: a sublayer reads and writes the residual stream)
    under ``<sublayer>.deltas.adapter`` and hook it beside ``sublayer``."""
    deltas = getattr(sublayer, "deltas", None)
    if deltas is None:
        deltas = sublayer.deltas = nn.ModuleDict()
    if Adapter.name in deltas:
        raise ConfigError(f"adapter: module '{name}' already has a parallel adapter")
    adapter = ParallelAdapter(hidden, cfg.width(hidden), cfg.nonlinearity, cfg.dropout, cfg.scale)
    deltas[Adapter.name] = adapter
    sublayer.register_forward_hook(AddBeside(adapter), with_kwargs=True)


def family_target(model: nn.Module, suffixes: tuple[str, ...]) -> str:
    """The first of ``suffixes`` that names a linear module of ``model`` (the first suffix when none
    does: targeting it then fails with the core's error naming the modules that exist)."""
    names = find_targets(model, "all-linear", Adapter.name)
    return next((s for s in suffixes if any(target_matches(n, s) for n in names)), suffixes[0])


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``adapter``."""
    register(Adapter)
