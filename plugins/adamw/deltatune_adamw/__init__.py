"""AdamW (decoupled weight decay) with linear warm-up and cosine decay.

Biases and normalisation weights (1-D parameters) get no weight decay, as is customary. The step is
torch's fused kernel (``torch.optim.AdamW(fused=True)``, CPU and CUDA) by default: one pass over every
parameter instead of a dozen small tensor operations per parameter, the same update.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import hookimpl, lr_groups, warmup_cosine


class AdamWConfig(BaseModel):
    """Options of the ``adamw`` optimizer."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (not on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="decay rates of the first and second moments")
    eps: float = Field(1e-8, gt=0, description="added to the denominator for numerical stability")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr (cosine decay)")
    schedule: bool = Field(True, description="warm-up + cosine decay; false keeps lr constant")
    fused: bool | None = Field(
        None, description="torch's fused AdamW step (None: wherever every parameter is a floating-point tensor on "
        "the CPU or a CUDA device). Lightning refuses trainer gradient clipping with a fused optimizer under "
        "16-mixed/bf16-mixed precision: set false there.")


def fused_step_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can step ``params`` (floating point, on the CPU or CUDA)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class AdamW:
    """The ``adamw`` optimizer factory."""

    name: ClassVar[str] = "adamw"
    Config: ClassVar[type[BaseModel]] = AdamWConfig
    default: ClassVar[bool] = True  # the optimizer of a run that names none
    honours_lr_multipliers: ClassVar[bool] = True

    def create(
        self, named_params: list[tuple[str, nn.Parameter]], cfg: AdamWConfig, total_steps: int,
        lr_multipliers: dict[str, float] | None = None,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """``torch.optim.AdamW`` over two groups (decayed matrices, undecayed vectors), each split by the
        learning-rate factors delta methods declare (``lr_multipliers``), and its schedule."""
        decay = [(n, p) for n, p in named_params if p.ndim >= 2]
        no_decay = [(n, p) for n, p in named_params if p.ndim < 2]
        groups = lr_groups([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], cfg.lr, lr_multipliers)
        params = [p for _, p in named_params]
        fused = cfg.fused if cfg.fused is not None else fused_step_supported(params)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
        scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio) if cfg.schedule else None
        return optimizer, scheduler

    def state_bytes_per_param(self, cfg: AdamWConfig, shape: tuple[int, ...], param_bytes: int) -> float:
        """Two moments (``exp_avg``, ``exp_avg_sq``) of the parameter's size and dtype."""
        return 2.0 * param_bytes * math.prod(shape)


@hookimpl
def deltatune_register_optimizers(register) -> None:
    """Provide ``adamw``."""
    register(AdamW)
