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
fp32 math for bf16 weights) lives in :class:`deltatune.fused.FusedOptimizer`; this file only holds
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
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune import hookimpl
from deltatune.fused import FusedOptimizer
from deltatune.schedules import warmup_cosine

__all__ = ["Config", "Lomo", "LomoOptimizer"]


class Config(BaseModel):
    """Options of the ``lomo`` optimizer."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0, description="peak learning rate (SGD needs larger values than Adam, e.g. 1e-2)")
    clip_grad_norm: float | None = Field(
        None, gt=0, description="clip the global gradient L2 norm to this value; costs a second backward pass"
    )
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay, as torch.optim.SGD's weight_decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="final learning rate as a fraction of lr (1.0: constant after warm-up)"
    )


class LomoOptimizer(FusedOptimizer):
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


class Lomo:
    """The ``lomo`` optimizer factory registered with deltatune."""

    name: ClassVar[str] = "lomo"
    Config: ClassVar[type[BaseModel]] = Config
    fused: ClassVar[bool] = True

    def create(
        self, named_params: list[tuple[str, nn.Parameter]], cfg: BaseModel, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """A :class:`LomoOptimizer` over ``named_params`` and a warm-up + cosine schedule."""
        assert isinstance(cfg, Config)
        optimizer = LomoOptimizer(
            list(named_params), lr=cfg.lr, weight_decay=cfg.weight_decay, clip_grad_norm=cfg.clip_grad_norm
        )
        return optimizer, warmup_cosine(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)

    @staticmethod
    def check_trainer_compatible(accumulate_grad_batches: int = 1, **settings: Any) -> None:
        """Raise :class:`ValueError` for trainer settings LOMO cannot honour: gradient accumulation,
        trainer-side gradient clipping, several devices, ``16-mixed`` precision (keywords
        ``gradient_clip_val``, ``world_size``, ``precision``; see
        :meth:`deltatune.fused.FusedOptimizer.check_trainer_compatible`)."""
        LomoOptimizer.check_trainer_compatible(accumulate_grad_batches, **settings)


@hookimpl
def deltatune_register_optimizers(register: Any) -> None:
    """Register the ``lomo`` optimizer."""
    register(Lomo)
