"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

Where LoRA trains a pair ``B A`` per layer, VeRA shares *one frozen random pair* across all
targeted layers and trains only two vectors per layer::

    y = W x + b + Λ_b B Λ_d A dropout(x)         Λ_d = diag(d) (r), Λ_b = diag(b) (out)

``A`` (``r x in_max``) and ``B`` (``out_max x r``) are drawn once, Kaiming-uniform, from a
generator seeded with ``projection_prng_key``, sized for the largest targeted layer; each layer
uses the top-left slice it needs. ``d`` starts at ``d_initial`` (0.1) and ``b`` at zero, so the
model is unchanged before training. Trainable parameters per layer: ``r + out``.

The projections are held once (a :class:`VeraProjections` module shared by every layer's delta)
and saved with the adapter, so a reload reproduces them exactly whatever the random number
generator does on another machine. Merging adds ``(b ⊙ B)(d ⊙ A)`` to ``W``. Outputs,
initialisation (same seed → same projections) and checkpoints match PEFT's ``VeraConfig``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import (
    PEFT_PREFIX,
    TARGETS_HELP,
    ConfigError,
    DeltaLinear,
    LayerDeltaMethod,
    WeightUpdateDelta,
    copy_named_tensors,
    delta_layers,
    hookimpl,
)


class VeraConfig(BaseModel):
    """Options of the ``vera`` delta method."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(256, gt=0, description="rank of the shared random projections")
    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description=TARGETS_HELP,
    )
    projection_prng_key: int = Field(0, ge=0, description="seed of the shared random projections A and B")
    d_initial: float = Field(0.1, description="initial value of every entry of the vector d")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the VeRA input")
    init_from: str | None = Field(None, description="a PEFT VeRA adapter folder to start from")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (fan-in, gain √2) from ``generator``: the draw PEFT's VeRA makes."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random pair shared by every VeRA layer of a model (persistent buffers)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator))
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator))


class VeraDelta(WeightUpdateDelta):
    """The trainable vectors ``d`` and ``b`` of one layer, over the shared projections."""

    def __init__(self, projections: VeraProjections, in_features: int, out_features: int, cfg: VeraConfig) -> None:
        super().__init__()
        self.projections = projections  # shared: the same module object in every layer
        self.in_features, self.out_features = in_features, out_features
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial)))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A`` (``r x in``) and ``B`` (``out x r``) slices of the shared pair."""
        return (self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features, :])

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """``result + b ⊙ B (d ⊙ A dropout(x))``."""
        a, b = self.sliced()
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else self.vera_lambda_d.dtype
        hidden = self.vera_lambda_d * F.linear(self.dropout(x.to(dtype)), a.to(dtype))
        return result + (self.vera_lambda_b * F.linear(hidden, b.to(hidden.dtype))).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``(b ⊙ B)(d ⊙ A)`` in fp32."""
        a, b = self.sliced()
        return (self.vera_lambda_b.float().unsqueeze(1) * b.float()) @ (self.vera_lambda_d.float().unsqueeze(1) * a.float())


PROJECTION_KEYS = ("vera_A", "vera_B")


class Vera(LayerDeltaMethod):
    """The ``vera`` delta method.

    ``prepare`` creates the shared projections for one ``apply`` and keeps them on the instance
    until the deltas are made; everything after that reads them from the model.
    """

    name: ClassVar[str] = "vera"
    Config: ClassVar[type[BaseModel]] = VeraConfig
    supports_quantized: ClassVar[bool] = True
    peft_fields: ClassVar[dict[str, str]] = {
        "r": "r",
        "projection_prng_key": "projection_prng_key",
        "d_initial": "d_initial",
        "dropout": "vera_dropout",
        "targets": "target_modules",
    }
    reads_peft: ClassVar[dict[str, Any]] = {"peft_type": "VERA"}

    def prepare(self, model: nn.Module, cfg: BaseModel, layer_names: list[str]) -> None:
        """Draw the shared projections, sized for the largest targeted layer."""
        layers = [model.get_submodule(name) for name in layer_names]
        max_in = max(layer.in_features for layer in layers)
        max_out = max(layer.out_features for layer in layers)
        device = next((p.device for p in layers[0].parameters()), torch.device("cpu"))
        self._projections = VeraProjections(cfg.r, max_in, max_out, cfg.projection_prng_key).to(device)

    def make_delta(self, layer: DeltaLinear, cfg: BaseModel, layer_name: str) -> VeraDelta:
        """Two vectors for ``layer`` over the shared projections."""
        return VeraDelta(self._projections, layer.in_features, layer.out_features, cfg)

    def projections(self, model: nn.Module) -> tuple[str, VeraProjections]:
        """The model key prefix and module of the shared projections (held by the first VeRA layer)."""
        for layer_name, _, delta in delta_layers(model, self.name):
            return f"{layer_name}.deltas.{self.name}.projections.", delta.projections
        raise ConfigError("vera: the model has no VeRA layer")

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The vectors of every layer and the shared projections once."""
        prefix, shared = self.projections(model)
        state = {k: v for k, v in super().state_dict(model).items() if ".projections." not in k}
        state.update({prefix + key: getattr(shared, key) for key in PROJECTION_KEYS})
        return state

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """PEFT ``VeraConfig`` fields equivalent to ``cfg`` (projections saved)."""
        return {
            "peft_type": "VERA",
            "r": cfg.r,
            "projection_prng_key": cfg.projection_prng_key,
            "d_initial": cfg.d_initial,
            "vera_dropout": cfg.dropout,
            "save_projection": True,
            "bias": "none",
        }

    def inner_width(self, cfg: BaseModel) -> int:
        """``r``: the scaled projection ``d ⊙ A x`` is kept for backward."""
        return cfg.r

    def peft_state_dict(self, model: nn.Module, cfg: BaseModel) -> dict[str, torch.Tensor]:
        """Per-layer ``vera_lambda_b``/``vera_lambda_d`` and PEFT's ``base_model.vera_A``/``vera_B``."""
        state: dict[str, torch.Tensor] = {}
        for layer_name, _, delta in delta_layers(model, self.name):
            for key in ("vera_lambda_b", "vera_lambda_d"):
                state[f"{PEFT_PREFIX}{layer_name}.{key}"] = getattr(delta, key).detach()
        _, shared = self.projections(model)
        state.update({f"base_model.{key}": getattr(shared, key) for key in PROJECTION_KEYS})
        return state

    def load_peft_state_dict(self, model: nn.Module, cfg: BaseModel, state: dict[str, torch.Tensor]) -> None:
        """Load a PEFT VeRA checkpoint; it must hold its projections (``save_projection: true``)."""
        if "base_model.vera_A" not in state:
            raise ConfigError(
                "vera: the PEFT adapter was saved without its projections (save_projection: false); "
                "deltatune only starts from VeRA adapters that contain base_model.vera_A and vera_B"
            )
        copy_named_tensors(self.peft_state_dict(model, cfg), state, self.name)


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``vera``."""
    register(Vera)
