"""How a LoRA pair starts: Kaiming-uniform ``A`` (PEFT's default), Gaussian ``A``, or from the base
weight itself — PiSSA (Meng et al., 2024: the principal singular vectors, exact SVD or the fast
randomised one with ``niter`` subspace iterations) and OLoRA (Büyükakyüz, 2024: the QR
decomposition) — with the residual ``W - s · B₀ A₀`` left in the base weight, so the model still
computes ``W`` before training. Each formula is PEFT's (``LoraLayer.pissa_init``/``olora_init``),
so the same base gives the same ``A₀``, ``B₀`` and residual.

A pair that starts from the base keeps its starting point ``A₀``, ``B₀`` as buffers (saved with the
adapter): reloading an adapter re-derives the residual from them rather than from a new
decomposition (a randomised SVD or another machine's SVD would differ), and exporting to PEFT
turns the pair into a plain LoRA of rank ``2r`` against the original base, ``ΔW = s (B A − B₀ A₀)
= s [B | −B₀] [A ; A₀]``, as PEFT's ``path_initial_model_for_weight_conversion`` does.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from deltatune.api import ConfigError, DeltaLinear, base_weight

INIT_PATTERN = r"^(kaiming|gaussian|pissa|pissa_niter_[0-9]+|olora)$"
"""The values of ``lora``'s ``init`` option."""


def starts_from_base(init: str) -> bool:
    """Whether ``init`` derives the pair from the base weight (and leaves a residual there)."""
    return init == "olora" or init.startswith("pissa")


def principal_pair(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` in fp32 for the dense ``out x in`` ``weight``: PiSSA's ``√S_r U_rᵀ`` and ``V_r √S_r``
    of ``W / s`` (exact, or ``pissa_niter_N``: ``torch.svd_lowrank`` with N iterations, drawing from
    the global random generator), or OLoRA's ``R_r`` and ``Q_r`` of ``W = Q R``."""
    weight = weight.detach().float()
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = re.fullmatch(r"pissa_niter_([0-9]+)", init)
    if niter:
        left, values, right = torch.svd_lowrank(weight, r, niter=int(niter.group(1)))
        right_t = right.t()
    else:
        left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
        left, values, right_t = left[:, :r], values[:r], right_t[:r]
    root = torch.diag(torch.sqrt(values / scaling))
    return (root @ right_t).contiguous(), (left @ root).contiguous()


def set_dense_weight(layer: DeltaLinear, weight: torch.Tensor) -> None:
    """Store the dense ``out x in`` ``weight`` as ``layer``'s base weight (transposed for a ``Conv1D``,
    in the base weight's dtype)."""
    stored = layer.weight
    with torch.no_grad():
        stored.copy_((weight.t() if layer.transposed else weight).to(stored.dtype))


def start_from_base(layer: DeltaLinear, delta: nn.Module, init: str) -> None:
    """Set ``delta``'s pair and its kept starting point from ``layer``'s base weight by ``init`` and
    leave the residual ``W - s · B₀ A₀`` in the base. On the meta device (the skeleton a run is
    checked on before weights load) there are no values to decompose: nothing happens."""
    rank, out_features, in_features = delta.lora_A.out_features, layer.out_features, layer.in_features
    if rank > min(out_features, in_features):
        raise ConfigError(f"init '{init}' takes r={rank} principal directions of a {out_features}x{in_features} weight, "
                          f"which has {min(out_features, in_features)}; choose r <= {min(out_features, in_features)} "
                          "or target other modules")
    if layer.weight.is_meta:
        return
    weight = base_weight(layer).detach().float()
    a0, b0 = principal_pair(weight, delta.lora_A.out_features, delta.scaling, init)
    with torch.no_grad():
        delta.lora_A.weight.copy_(a0)
        delta.lora_B.weight.copy_(b0)
        delta.initial_A.copy_(a0)
        delta.initial_B.copy_(b0)
    set_dense_weight(layer, weight - delta.scaling * (b0 @ a0))
    layer.register_load_state_dict_pre_hook(_ResidualFollowsStart(delta))


class _ResidualFollowsStart:
    """A load hook on a layer whose base holds the residual of ``delta``'s starting point: when an
    adapter brings a different starting point ``A₀'``, ``B₀'`` (decomposed elsewhere, or by a
    randomised SVD), the residual becomes ``W - s · B₀' A₀'`` so the loaded pair computes what it was
    trained with. A state dict that carries the base weight itself is left alone."""

    def __init__(self, delta: nn.Module) -> None:
        self.delta = delta

    def __call__(self, layer: DeltaLinear, state: dict[str, Any], prefix: str, *_: Any) -> None:
        key = next((k for k, v in layer.deltas.items() if v is self.delta), None)
        if key is None or f"{prefix}base_layer.weight" in state:
            return
        new_a = state.get(f"{prefix}deltas.{key}.initial_A")
        new_b = state.get(f"{prefix}deltas.{key}.initial_B")
        if new_a is None or new_b is None or (torch.equal(new_a, self.delta.initial_A)
                                              and torch.equal(new_b, self.delta.initial_B)):
            return
        old = self.delta.initial_B @ self.delta.initial_A
        new = new_b.float().to(old.device) @ new_a.float().to(old.device)
        set_dense_weight(layer, base_weight(layer).detach().float() + self.delta.scaling * (old - new))


def gaussian_(weight: torch.Tensor, r: int) -> None:
    """PEFT's ``gaussian`` init of ``A``: normal with standard deviation ``1 / r``."""
    nn.init.normal_(weight, std=1 / r)


def converted_pair(delta: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LoRA pair ``([A ; A₀], [B | −B₀])`` (rank ``2r``, the same scale) that computes
    ``ΔW = s (B A − B₀ A₀)`` against the original base."""
    a, b = delta.lora_A.weight.detach(), delta.lora_B.weight.detach()
    return (torch.cat([a.float(), delta.initial_A.float()], dim=0).to(a.dtype),
            torch.cat([b.float(), -delta.initial_B.float()], dim=1).to(b.dtype))


def doubled_alpha(alpha: float, rslora: bool) -> float:
    """The ``alpha`` that keeps the scale at rank ``2r``: ``2 alpha`` (``alpha / r``), ``√2 alpha`` with rsLoRA."""
    return alpha * (math.sqrt(2) if rslora else 2)
