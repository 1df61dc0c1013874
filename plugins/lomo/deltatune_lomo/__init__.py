"""LOMO: LOw-Memory Optimization (Lv et al., 2023) as a deltatune optimizer plugin.

LOMO is plain SGD whose update is fused into backward: each parameter is updated the moment its
gradient is final and the gradient is freed at once, so a full fine-tune never holds a full set of
gradients and keeps no optimizer state. Memory is then the weights plus activations — the paper
fine-tunes a 65B model on 8 x RTX 3090 that way.

The update of a parameter ``p`` with gradient ``g`` (learning rate ``lr``, weight decay ``wd``)::

    p <- p * (1 - lr * wd) - lr * g

which is exactly :class:`torch.optim.SGD` (``momentum=0``, L2 ``weight_decay=wd``). With
``clip_grad_norm`` every gradient is first multiplied by ``min(1, clip / (global_norm + 1e-6))`` as
:func:`torch.nn.utils.clip_grad_norm_` does; because the update happens during backward, the global
norm is measured in an extra backward pass, so **clipping doubles the backward cost**
(``optimizer.backward_passes`` counts it). The machinery (hooks, clipping pass, fp16 loss scaling,
fp32 math for bf16 weights) lives in :class:`deltatune.api.InBackwardOptimizer`; this file only holds
the update rule.

Constraints (checked by :meth:`Lomo.check_trainer_compatible` before training): no gradient
accumulation, no trainer-side gradient clipping, a single device.

Usage::

    optimizer: {name: lomo, config: {lr: 1.0e-2, clip_grad_norm: 1.0}}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field

from deltatune.api import InBackwardOptimizer, InBackwardOptimizerConfig, InBackwardOptimizerFactory, hookimpl

__all__ = ["Config", "Lomo", "LomoOptimizer"]


class Config(InBackwardOptimizerConfig):
    """Options of the ``lomo`` optimizer (and the shared ``clip_grad_norm``, ``warmup_steps``, ``min_lr_ratio``)."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate (SGD needs larger values than Adam, e.g. 1e-2)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay, as torch.optim.SGD's weight_decay")


class LomoOptimizer(InBackwardOptimizer):
    """SGD fused into backward (LOMO). Keeps no optimizer state.

    Args:
        params: parameters, ``(name, parameter)`` pairs or parameter groups.
        lr: learning rate (per group; schedulers may change it).
        weight_decay: L2 weight decay coefficient, as in :class:`torch.optim.SGD`.
        clip_grad_norm: global gradient-norm clipping threshold, or ``None``.
    """

    plugin_name: ClassVar[str] = "lomo"
    elementwise: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clip_grad_norm: float | None = None,
    ) -> None:
        if weight_decay < 0:
            raise ValueError(f"lomo: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, clip_grad_norm=clip_grad_norm)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """``param <- param * (1 - lr * weight_decay) - lr * grad`` (in fp32, in place)."""
        lr = group["lr"]
        if group["weight_decay"]:
            param.mul_(1.0 - lr * group["weight_decay"])
        param.add_(grad, alpha=-lr)


class Lomo(InBackwardOptimizerFactory):
    """The ``lomo`` optimizer factory registered with deltatune: a :class:`LomoOptimizer` with a
    warm-up + cosine schedule; trainer settings it cannot honour are refused by
    :meth:`~deltatune.api.InBackwardOptimizerFactory.check_trainer_compatible`."""

    name: ClassVar[str] = "lomo"
    Config: ClassVar[type[BaseModel]] = Config
    optimizer_class: ClassVar[type[InBackwardOptimizer]] = LomoOptimizer

    def state_bytes_per_param(self, cfg: Config, shape: tuple[int, ...], param_bytes: int) -> float:
        """None: LOMO is plain SGD."""
        return 0.0


@hookimpl
def deltatune_register_optimizers(register: Any) -> None:
    """Register the ``lomo`` optimizer."""
    register(Lomo)
