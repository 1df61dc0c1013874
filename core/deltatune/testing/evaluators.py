"""The contract of evaluators: :class:`EvaluatorContract`."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.deltas.layer import wrap_linear
from deltatune.deltas.targets import find_targets
from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.protocols import Row
from deltatune.testing.contract import PluginContract
from deltatune.testing.helpers import sample_rows, snapshot


class EvaluatorContract(PluginContract):
    """The contract of an evaluator (:class:`deltatune.plugin.protocols.Evaluator`).

    Checked on the tiny model, called as the core calls it (eval mode, ``torch.no_grad``), on
    :meth:`make_rows` (default :func:`sample_rows`): it returns a non-empty flat ``dict[str, float]``
    of finite values including :attr:`expected_metrics`; two calls agree; it changes no parameter and
    leaves no gradient; it works on a model whose linear layers the core wrapped for delta methods
    (:class:`deltatune.deltas.layer.DeltaLinear`): with the deltas of :attr:`wrapped_with` (a delta
    method's plugin reference) when set, else every linear layer wrapped with no delta.
    """

    kind: ClassVar[str] = "evaluator"
    evaluator_name: ClassVar[str] = ""
    expected_metrics: ClassVar[set[str]] = set()
    wrapped_with: ClassVar[dict[str, Any] | None] = None
    """A delta method (``{"name": ..., "config": {...}}``) whose wrapped model the evaluator must handle."""

    def make_rows(self, tokenizer: Any) -> list[Row]:
        """The rows evaluated (default :func:`sample_rows`)."""
        return sample_rows(tokenizer)

    def run(self, manager: PluginManager, model: nn.Module) -> dict[str, float]:
        """The evaluator on ``model``, as the core calls it."""
        plugin = self.resolved(manager)
        model.eval()
        with torch.no_grad():
            return plugin.plugin.evaluate(model, self.tokenizer(), self.make_rows(self.tokenizer()), plugin.cfg)

    def test_returns_flat_finite_float_metrics(self, manager: PluginManager) -> None:
        """A non-empty flat ``dict[str, float]`` with finite values and the expected keys."""
        metrics = self.run(manager, models.load_model(self.base, torch.float32))
        assert isinstance(metrics, dict) and metrics, "no metrics"
        for key, value in metrics.items():
            assert isinstance(key, str) and key and "/" not in key, f"bad metric name {key!r}"
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} is {type(value).__name__}"
            assert math.isfinite(value), f"{key} = {value}"
        assert self.expected_metrics <= set(metrics), f"missing {sorted(self.expected_metrics - set(metrics))}"

    def test_deterministic_and_does_not_train(self, manager: PluginManager) -> None:
        """Two calls agree, and no parameter or gradient changes."""
        model = models.load_model(self.base, torch.float32)
        before = snapshot(model)
        first, second = self.run(manager, model), self.run(manager, model)
        assert first == second
        for name, param in model.named_parameters():
            assert torch.equal(param, before[name]), f"evaluation changed {name}"
            assert param.grad is None, f"evaluation left a gradient on {name}"

    def test_works_on_a_delta_wrapped_model(self, manager: PluginManager) -> None:
        """Works on a model built by the pipeline with the delta method :attr:`wrapped_with`, or, without
        one, on the base with every linear layer wrapped in a :class:`DeltaLinear` holding no delta."""
        from deltatune.model.assembly import build_model, resolve_spec

        if self.wrapped_with is None:
            model = models.load_model(self.base, torch.float32)
            for name in find_targets(model, "all-linear", self.evaluator_name):
                wrap_linear(model, name)
        else:
            spec = {"base": self.base, "delta": [self.wrapped_with], "base_dtype": "fp32"}
            model = build_model(resolve_spec(spec, manager))
        plain = self.run(manager, models.load_model(self.base, torch.float32))
        wrapped = self.run(manager, model)
        assert set(wrapped) == set(plain)
        assert all(math.isfinite(v) for v in wrapped.values())
