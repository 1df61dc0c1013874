"""Learning-rate schedules and learning-rate groups shared by optimizer plugins."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the peak
    learning rate at ``total_steps``. Stepped once per optimizer step."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_groups(
    groups: list[dict[str, Any]], lr: float, lr_multipliers: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """torch parameter groups: each of ``groups`` (``params``: a list of ``(name, parameter)``, plus any
    other group options) split by the learning-rate factor ``lr_multipliers`` gives each name (1
    when absent), a group with a factor other than 1 getting ``lr = lr x factor``. Empty groups are
    dropped; ``params`` come back as plain parameters. A schedule scales every group's own ``lr``, so
    the factors hold at every step."""
    lr_multipliers = lr_multipliers or {}
    out: list[dict[str, Any]] = []
    for group in groups:
        by_factor: dict[float, list[nn.Parameter]] = {}
        for name, param in group["params"]:
            by_factor.setdefault(float(lr_multipliers.get(name, 1.0)), []).append(param)
        for factor, params in by_factor.items():
            options = {k: v for k, v in group.items() if k != "params"}
            out.append({"params": params, **options, **({"lr": lr * factor} if factor != 1.0 else {})})
    return out
