"""train/schedules: the warm-up + cosine factor at every step, and learning-rate groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.train.schedules import lr_groups, warmup_cosine


def lrs(warmup: int, total: int, min_ratio: float, steps: int) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    schedule = warmup_cosine(optimizer, warmup, total, min_ratio)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_warmup_is_linear_and_never_zero():
    seen = lrs(warmup=4, total=20, min_ratio=0.0, steps=5)
    assert seen[:4] == pytest.approx([2.0 * (s + 1) / 5 for s in range(4)])
    assert min(seen) > 0  # the first step already learns
    assert seen[4] == pytest.approx(2.0)  # peak right after warm-up


def test_cosine_reaches_the_floor_at_total_steps_and_stays_there():
    seen = lrs(warmup=2, total=12, min_ratio=0.1, steps=16)
    halfway = 2 + 5
    assert seen[halfway] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert seen[12] == pytest.approx(0.2)
    assert seen[15] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(seen[2:], seen[3:]))  # never rises after the peak


def test_no_warmup_starts_at_the_peak():
    assert lrs(warmup=0, total=10, min_ratio=0.0, steps=1) == [pytest.approx(2.0)]


def test_lr_groups_split_each_group_by_its_multiplier_and_keep_group_options():
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = [{"params": [("x.lora_A", a), ("x.lora_B", b)], "weight_decay": 0.1},
              {"params": [("bias", c)], "weight_decay": 0.0},
              {"params": [], "weight_decay": 0.5}]
    out = lr_groups(groups, lr=1e-3, lr_multipliers={"x.lora_B": 16})
    assert len(out) == 3  # the empty group is dropped
    by_param = {id(p): g for g in out for p in g["params"]}
    assert "lr" not in by_param[id(a)] and by_param[id(a)]["weight_decay"] == 0.1
    assert by_param[id(b)]["lr"] == pytest.approx(16e-3) and by_param[id(b)]["weight_decay"] == 0.1
    assert by_param[id(c)]["weight_decay"] == 0.0


def test_a_schedule_keeps_the_multiplier_at_every_step():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    groups = lr_groups([{"params": [("a", a), ("b", b)]}], lr=1.0, lr_multipliers={"b": 4})
    optimizer = torch.optim.SGD(groups, lr=1.0)
    schedule = warmup_cosine(optimizer, 3, 10)
    for _ in range(6):
        optimizer.step()
        schedule.step()
        plain, boosted = (g["lr"] for g in optimizer.param_groups)
        assert boosted == pytest.approx(4 * plain)
