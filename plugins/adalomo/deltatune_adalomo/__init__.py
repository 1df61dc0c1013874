"""AdaLomo (Lv et al., 2023): LOMO with an adaptive learning rate, as a deltatune optimizer plugin.

AdaLomo keeps LOMO's update fused into backward (no gradients are held; each is freed as soon as its
parameter is updated) and adds Adafactor's adaptive step: a second-moment estimate stored *factored*
(one row and one column vector per matrix, ``O(n + m)`` instead of ``O(n m)``), so its only state is
those statistics. For a parameter ``X`` with gradient ``G`` at step ``t``::

    beta2  = 1 - t ** decay_rate                                  # decay_rate = -0.8
    R      = beta2 R + (1 - beta2) mean_cols(G^2 + eps1)          # matrices: row statistics
    C      = beta2 C + (1 - beta2) mean_rows(G^2 + eps1)          #           column statistics
    V      = R C^T / mean(R)                                      # (vectors keep V itself)
    U      = G / sqrt(V)
    U      = U / max(1, RMS(U) / clip_threshold)                  # "grouped update normalization"
    lr_t   = lr * max(eps2, RMS(X))                               # relative step size
    X      = X (1 - lr_t wd) - lr_t U

This is Adafactor without first moment, with ``relative_step=False`` and ``scale_parameter=True``.
Precisely: with ``clip_grad_norm=None`` it equals
``transformers.optimization.Adafactor(lr=lr, beta1=None, relative_step=False, scale_parameter=True,
warmup_init=False, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
weight_decay=weight_decay)`` up to float rounding, and with ``clip_grad_norm=c`` it equals that
Adafactor run after :func:`torch.nn.utils.clip_grad_norm_` (``c``). Adafactor's ``beta1`` (a full
first moment) and ``relative_step=True`` have no AdaLomo counterpart; the step counter is kept per
parameter, as in Adafactor (``lomo_optim.AdaLomo`` keeps one global counter, which differs only when
a parameter receives no gradient in some step).

The AdaLomo paper replaces LOMO's global gradient-norm clipping (two backward passes) by the
per-parameter update normalization above, so ``clip_grad_norm`` defaults to ``None`` here; setting it
adds the extra backward pass (``optimizer.backward_passes`` counts it).

Usage::

    optimizer: {name: adalomo, config: {lr: 1.0e-3}}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field

from deltatune.api import InBackwardOptimizer, InBackwardOptimizerConfig, InBackwardOptimizerFactory, hookimpl

__all__ = ["AdaLomo", "AdaLomoOptimizer", "Config"]


class Config(InBackwardOptimizerConfig):
    """Options of the ``adalomo`` optimizer (and the shared ``clip_grad_norm``, ``warmup_steps``, ``min_lr_ratio``)."""

    lr: float = Field(1e-3, gt=0, description="peak relative learning rate (scaled by each parameter's RMS)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay, scaled by the relative step")
    eps: tuple[float, float] = Field(
        (1e-30, 1e-3), description="(added to squared gradients, lower bound of the parameter RMS)"
    )
    decay_rate: float = Field(-0.8, lt=0, description="second-moment decay: beta2_t = 1 - t ** decay_rate")
    clip_threshold: float = Field(1.0, gt=0, description="update normalization: RMS(update) is capped at this")


class AdaLomoOptimizer(InBackwardOptimizer):
    """AdaLomo: factored adaptive learning rate, update fused into backward.

    Its state per parameter is ``step`` and either ``exp_avg_sq_row``/``exp_avg_sq_col`` (tensors
    with two or more dimensions) or ``exp_avg_sq`` (vectors), all ``float32``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or parameter groups.
        lr: relative learning rate (per group; schedulers may change it).
        eps: ``(eps1, eps2)``: added to squared gradients; lower bound of the parameter RMS.
        clip_threshold: cap on the RMS of each parameter's update.
        decay_rate: ``beta2_t = 1 - t ** decay_rate``.
        weight_decay: decoupled weight decay, multiplied by the relative step size.
        clip_grad_norm: global gradient-norm clipping threshold, or ``None``.
    """

    plugin_name: ClassVar[str] = "adalomo"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        clip_grad_norm: float | None = None,
    ) -> None:
        if decay_rate >= 0:
            raise ValueError(f"adalomo: decay_rate must be negative, got {decay_rate}")
        if clip_threshold <= 0:
            raise ValueError(f"adalomo: clip_threshold must be positive, got {clip_threshold}")
        if weight_decay < 0:
            raise ValueError(f"adalomo: weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm)

    def _init_state(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Zero statistics in fp32: row and column vectors for a matrix, a full vector otherwise."""
        shape, device = param.shape, param.device
        state["step"] = 0
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=device)

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / math.sqrt(tensor.numel())

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """One AdaLomo step for ``param`` (fp32, in place); ``grad`` is consumed in place."""
        eps1, eps2 = group["eps"]
        factored = grad.dim() >= 2
        if not state:
            self._init_state(param, group, state)
        state["step"] += 1
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        lr = group["lr"] * torch.clamp(self._rms(param), min=eps2)  # relative step: uses X before the update

        if factored:
            # mean(G^2 + eps1) over columns / rows as reductions (no n x m temporary of G^2)
            row_mean = torch.linalg.vector_norm(grad, 2, dim=-1).square_().div_(grad.shape[-1]).add_(eps1)
            col_mean = torch.linalg.vector_norm(grad, 2, dim=-2).square_().div_(grad.shape[-2]).add_(eps1)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
            # U = G * rsqrt(V) with V = R C^T / mean(R), computed in place on G (no n x m temporary)
            update = grad.mul_((row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1))
            update.mul_(col.unsqueeze(-2).rsqrt())
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(grad.square().add_(eps1), alpha=1.0 - beta2t)
            update = grad.mul_(v.rsqrt())
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["weight_decay"]:
            param.mul_(1.0 - group["weight_decay"] * lr)
        param.sub_(update)


class AdaLomo(InBackwardOptimizerFactory):
    """The ``adalomo`` optimizer factory registered with deltatune: an :class:`AdaLomoOptimizer`
    with a warm-up + cosine schedule; trainer settings it cannot honour are refused by
    :meth:`~deltatune.api.InBackwardOptimizerFactory.check_trainer_compatible`."""

    name: ClassVar[str] = "adalomo"
    Config: ClassVar[type[BaseModel]] = Config
    optimizer_class: ClassVar[type[InBackwardOptimizer]] = AdaLomoOptimizer

    def state_bytes_per_param(self, cfg: Config, shape: tuple[int, ...], param_bytes: int) -> float:
        """fp32 factored statistics (:meth:`AdaLomoOptimizer._init_state`): a row and a column vector
        for a matrix, a full vector otherwise."""
        if len(shape) >= 2:
            return 4.0 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
        return 4.0 * math.prod(shape)


@hookimpl
def deltatune_register_optimizers(register: Any) -> None:
    """Register the ``adalomo`` optimizer."""
    register(AdaLomo)
