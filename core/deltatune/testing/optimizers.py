"""The contract of optimizer factories: :class:`OptimizerContract`."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.plugin.manager import PluginManager
from deltatune.testing.contract import PluginContract
from deltatune.testing.helpers import through_bytes
from deltatune.train.update_in_backward import optimizer_updates_in_backward


class OptimizerContract(PluginContract):
    """The contract of an optimizer factory (:class:`deltatune.plugin.protocols.OptimizerFactory`).

    Checked on a small quadratic problem with :attr:`config`: ``create`` returns an optimizer and a
    scheduler bound to it (or ``None``); the optimizer holds exactly the given parameters and changes
    no other; :attr:`steps` steps lower the loss below :attr:`target_ratio` of its start; the
    schedule gives finite non-negative rates for ``total_steps`` steps; and a state dict saved after
    some steps continues identically in a fresh optimizer (resuming from a checkpoint). Optimizers
    that update inside backward (:class:`deltatune.train.update_in_backward.InBackwardOptimizer`) are
    driven with ``backward_and_update(loss)``, the others with ``backward`` + ``step``.
    """

    kind: ClassVar[str] = "optimizer"
    optimizer_name: ClassVar[str] = ""
    config: ClassVar[dict[str, Any]] = {"lr": 0.05}
    steps: ClassVar[int] = 30
    target_ratio: ClassVar[float] = 0.5

    class Problem(nn.Module):
        """``|W - T|^2 + |b - t|^2`` plus a parameter ``other`` that is never given to the optimizer."""

        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.weight = nn.Parameter(torch.randn(8, 4, generator=generator))
            self.bias = nn.Parameter(torch.randn(8, generator=generator))
            self.other = nn.Parameter(torch.randn(8, generator=generator))
            self.register_buffer("target_w", torch.randn(8, 4, generator=generator))
            self.register_buffer("target_b", torch.randn(8, generator=generator))

        def forward(self) -> torch.Tensor:
            return ((self.weight - self.target_w) ** 2).sum() + ((self.bias - self.target_b) ** 2).sum() + (
                (self.other ** 2).sum())

    def create(self, manager: PluginManager, problem: nn.Module, total_steps: int | None = None) -> tuple[Any, Any]:
        """The optimizer and scheduler over ``weight`` and ``bias`` of ``problem``."""
        plugin = self.resolved(manager)
        named = [("weight", problem.weight), ("bias", problem.bias)]
        return plugin.plugin.create(named, plugin.cfg, total_steps or self.steps)

    @staticmethod
    def step(optimizer: Any, scheduler: Any, problem: nn.Module) -> float:
        """One optimisation step; returns the loss before it."""
        loss = problem()
        if optimizer_updates_in_backward(optimizer):
            optimizer.backward_and_update(loss)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return float(loss.detach())

    def test_create_returns_an_optimizer_and_its_scheduler(self, manager: PluginManager) -> None:
        """``(torch.optim.Optimizer, LRScheduler of that optimizer or None)``."""
        result = self.create(manager, self.Problem())
        assert isinstance(result, tuple) and len(result) == 2, "create() must return (optimizer, scheduler)"
        optimizer, scheduler = result
        assert isinstance(optimizer, torch.optim.Optimizer)
        if scheduler is not None:
            assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
            assert scheduler.optimizer is optimizer

    def test_holds_and_changes_only_the_given_parameters(self, manager: PluginManager) -> None:
        """The optimizer's groups hold exactly the given parameters; ``other`` never changes."""
        problem = self.Problem()
        optimizer, scheduler = self.create(manager, problem)
        held = [p for group in optimizer.param_groups for p in group["params"]]
        assert sorted(map(id, held)) == sorted([id(problem.weight), id(problem.bias)])
        other = problem.other.detach().clone()
        for _ in range(3):
            self.step(optimizer, scheduler, problem)
        assert torch.equal(problem.other.detach(), other), "a parameter not given to the optimizer changed"

    def test_steps_lower_a_quadratic_loss(self, manager: PluginManager) -> None:
        """:attr:`steps` steps bring the loss below :attr:`target_ratio` of where it started."""
        problem = self.Problem()
        problem.other.requires_grad_(False)
        optimizer, scheduler = self.create(manager, problem)
        start = float(problem().detach())
        for _ in range(self.steps):
            self.step(optimizer, scheduler, problem)
        end = float(problem().detach())
        assert math.isfinite(end) and end < self.target_ratio * start, f"loss {start:.3f} -> {end:.3f}"

    def test_schedule_is_finite_over_total_steps(self, manager: PluginManager) -> None:
        """Learning rates stay finite and non-negative over ``total_steps`` scheduler steps."""
        problem = self.Problem()
        optimizer, scheduler = self.create(manager, problem, total_steps=50)
        for _ in range(50):
            for group in optimizer.param_groups:
                assert math.isfinite(group["lr"]) and group["lr"] >= 0
            if scheduler is not None:
                if not optimizer_updates_in_backward(optimizer):
                    optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
                scheduler.step()

    def test_state_dict_resumes_identically(self, manager: PluginManager) -> None:
        """After some steps, a fresh optimizer loaded with the state dict continues identically."""
        problem = self.Problem()
        problem.other.requires_grad_(False)
        optimizer, scheduler = self.create(manager, problem)
        for _ in range(4):
            self.step(optimizer, scheduler, problem)
        copy = self.Problem()
        copy.other.requires_grad_(False)
        copy.load_state_dict(problem.state_dict())
        resumed, resumed_scheduler = self.create(manager, copy)
        # through bytes, as from a checkpoint file (an in-memory state dict shares its tensors)
        resumed.load_state_dict(through_bytes(optimizer.state_dict()))
        if scheduler is not None:
            resumed_scheduler.load_state_dict(through_bytes(scheduler.state_dict()))
        for _ in range(3):
            self.step(optimizer, scheduler, problem)
            self.step(resumed, resumed_scheduler, copy)
        torch.testing.assert_close(copy.weight.detach(), problem.weight.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(copy.bias.detach(), problem.bias.detach(), rtol=1e-6, atol=1e-7)
