"""LoRA+ (``loraplus_lr_ratio``): B trains at the ratio times A's learning rate, through the parameter
groups every optimizer that honours a delta method's learning-rate factors builds (a real step of
adamw and of lomo, updates compared); without the option nothing changes; an optimizer that cannot
honour it is refused before any weight loads."""

from __future__ import annotations

import types
from typing import ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from deltatune import hookimpl
from deltatune.api import ConfigError
from deltatune.deltas.layer import delta_layers
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.resolve import resolve
from deltatune.train.module import check_lr_multipliers, lr_multipliers

RATIO = 16.0


def lora_model(ratio: float | None):
    config = {"r": 4, "targets": ["q_proj", "v_proj"], **({"loraplus_lr_ratio": ratio} if ratio else {})}
    resolved = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="fp32", delta=[{"name": "lora", "config": config}]))
    torch.manual_seed(0)  # A's Kaiming initialisation: the same in every model built here
    model = build_model(resolved)
    with torch.no_grad():
        for _, _, delta in delta_layers(model, "lora"):
            delta.lora_B.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))  # A gets a gradient too
    return model, resolved


def optimizer_for(model, resolved, optimizer: dict):
    plugin = resolve("optimizer", optimizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    multipliers = lr_multipliers(resolved, named)
    created, _ = plugin.plugin.create(named, plugin.cfg, 10, **({"lr_multipliers": multipliers} if multipliers else {}))
    return created, multipliers


def loss_of(model):
    ids = torch.arange(3, 40).reshape(1, -1)
    return model(input_ids=ids, labels=ids).loss


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def updates(model, before):
    """Mean |update| of A and of B over every layer."""
    moved = {n: (p.detach() - before[n]).abs().mean() for n, p in model.named_parameters() if p.requires_grad}
    return (torch.stack([v for n, v in moved.items() if "lora_A" in n]).mean(),
            torch.stack([v for n, v in moved.items() if "lora_B" in n]).mean())


def test_adamw_moves_b_at_ratio_times_the_learning_rate_of_a() -> None:
    model, resolved = lora_model(RATIO)
    optimizer, multipliers = optimizer_for(model, resolved, {"name": "adamw", "config": {"lr": 1e-3, "schedule": False}})
    assert set(multipliers) == {n for n, _ in model.named_parameters() if "lora_B" in n} and len(multipliers) == 4
    before = snapshot(model)
    loss_of(model).backward()
    optimizer.step()
    a, b = updates(model, before)  # Adam's first step moves each element by lr (its sign): the ratio shows as is
    assert b / a == pytest.approx(RATIO, rel=1e-3)
    assert a == pytest.approx(1e-3, rel=1e-2)


def test_lomo_moves_b_at_ratio_times_the_learning_rate_of_a() -> None:
    """SGD-like: the update is lr x gradient, so B's update over its gradient is the ratio times A's."""
    ratios = {}
    for ratio in (None, RATIO):
        model, resolved = lora_model(ratio)
        optimizer, _ = optimizer_for(model, resolved, {"name": "lomo", "config": {"lr": 1e-2}})
        before = snapshot(model)
        reference, _ = lora_model(None)
        loss_of(reference).backward()
        grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        optimizer.backward_and_update(loss_of(model))
        lrs = {n: ((p.detach() - before[n]).norm() / grads[n].norm()).item()
               for n, p in model.named_parameters() if p.requires_grad}
        ratios[ratio] = (max(v for n, v in lrs.items() if "lora_B" in n), min(v for n, v in lrs.items() if "lora_B" in n),
                         max(v for n, v in lrs.items() if "lora_A" in n))
    b_hi, b_lo, a = ratios[RATIO]
    assert b_lo == pytest.approx(RATIO * 1e-2, rel=1e-4) and b_hi == pytest.approx(b_lo, rel=1e-4)
    assert a == pytest.approx(1e-2, rel=1e-4)
    assert ratios[None][0] == pytest.approx(1e-2, rel=1e-4)


def test_without_the_option_nothing_changes() -> None:
    model, resolved = lora_model(None)
    optimizer, multipliers = optimizer_for(model, resolved, {"name": "adamw", "config": {"lr": 1e-3}})
    assert multipliers == {}
    assert [len(g["params"]) for g in optimizer.param_groups] == [8] and optimizer.param_groups[0]["lr"] == 1e-3


class ConstantLr:
    """An optimizer plugin that does not declare ``honours_lr_multipliers``."""

    name: ClassVar[str] = "constant_sgd"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lr: float = 0.1

    def create(self, named_params, cfg, total_steps):
        return torch.optim.SGD([p for _, p in named_params], lr=cfg.lr), None


def test_an_optimizer_that_cannot_honour_the_ratio_is_refused_before_weights_load() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    module = types.ModuleType("deltatune_constant_sgd")

    @hookimpl
    def deltatune_register_optimizers(register) -> None:
        register(ConstantLr)

    module.deltatune_register_optimizers = deltatune_register_optimizers
    manager.register_module(module, distribution="deltatune-constant-sgd")
    assert not manager.failures
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {"loraplus_lr_ratio": 4}}]),
                            manager)
    with pytest.raises(ConfigError, match="'lora'.*lora_B.weight.*optimizer 'constant_sgd' does not support"):
        check_lr_multipliers(resolved, resolve("optimizer", "constant_sgd", manager))
    plain = resolve_spec(ModelSpec(base="tiny-llama", delta=["lora"]), manager)
    check_lr_multipliers(plain, resolve("optimizer", "constant_sgd", manager))  # no ratio: accepted

