"""The contract of quantizers: :class:`QuantizerContract`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.testing.contract import PluginContract
from deltatune.testing.helpers import logits_of, relative_error, sample_batch, snapshot, training_loss


class QuantizerContract(PluginContract):
    """The contract of a quantizer (:class:`deltatune.plugin.protocols.Quantizer`).

    Checked on the tiny model with :attr:`config`: ``quantize`` replaces linear layers only and
    ``is_quantized`` tells them apart; ``dequantize_weight`` has the layer's shape and is within
    :attr:`max_weight_error` (relative) of the dense weight; it is what the layer computes with;
    quantizing the dequantized weights again gives them back (within :attr:`roundtrip_tolerance`);
    the quantized model's logits stay within :attr:`max_logit_error` of the dense ones; and the delta
    method :attr:`delta` (a plugin reference; without it that test is skipped, saying so) trains on
    top, merges and reloads.
    """

    kind: ClassVar[str] = "quantizer"
    quantizer_name: ClassVar[str] = ""
    max_weight_error: ClassVar[float] = 0.15
    max_logit_error: ClassVar[float] = 0.25
    roundtrip_tolerance: ClassVar[float] = 0.01
    layer_tolerance: ClassVar[float] = 0.02
    delta: ClassVar[dict[str, Any] | None] = None
    """A delta method (``{"name": ..., "config": {...}}``) that must train on the quantized base."""

    def quantized(self, manager: PluginManager) -> tuple[nn.Module, nn.Module, Any]:
        """``(dense model, quantized copy, resolved plugin)``."""
        from deltatune.model.assembly import apply_quantizer

        plugin = self.resolved(manager)
        dense = models.load_model(self.base, torch.float32)
        model = models.load_model(self.base, torch.float32)
        apply_quantizer(model, plugin)
        return dense, model, plugin

    def quantized_layers(self, model: nn.Module, plugin: Any) -> dict[str, nn.Module]:
        found = {name: m for name, m in model.named_modules() if plugin.plugin.is_quantized(m)}
        assert found, "quantize() quantized no layer"
        return found

    def test_quantizes_linear_layers_only(self, manager: PluginManager) -> None:
        """Quantized modules were linear layers; embeddings, norms and the model are not quantized."""
        dense, model, plugin = self.quantized(manager)
        linear = {name for name, m in dense.named_modules() if isinstance(m, nn.Linear)}
        for name in self.quantized_layers(model, plugin):
            assert name in linear, f"{name} was not a linear layer"
        for name, module in model.named_modules():
            if isinstance(module, (nn.Embedding,)) or "norm" in type(module).__name__.lower() or module is model:
                assert not plugin.plugin.is_quantized(module), f"{name} ({type(module).__name__}) claims to be quantized"

    def test_dequantized_weights_are_close_and_computed_with(self, manager: PluginManager) -> None:
        """``dequantize_weight`` has the dense shape, is close to it, and is what forward multiplies by."""
        dense, model, plugin = self.quantized(manager)
        x = torch.randn(3, 5, dense.config.hidden_size, generator=torch.Generator().manual_seed(0))
        for name, module in self.quantized_layers(model, plugin).items():
            original = dense.get_submodule(name).weight
            weight = plugin.plugin.dequantize_weight(module)
            assert tuple(weight.shape) == tuple(original.shape), f"{name}: {tuple(weight.shape)}"
            error = relative_error(weight, original)
            assert error <= self.max_weight_error, f"{name}: relative weight error {error:.3f}"
            if module.in_features != x.shape[-1]:
                continue
            with torch.no_grad():
                out = module(x).float()
                bias = module.bias.float() if module.bias is not None else None
                expected = torch.nn.functional.linear(x, weight.float(), bias)
            assert relative_error(out, expected) <= self.layer_tolerance, f"{name} does not compute with dequantize_weight"

    def test_quantize_dequantize_round_trip(self, manager: PluginManager) -> None:
        """Quantizing the dequantized weights again reproduces them."""
        from deltatune.model.assembly import apply_quantizer

        _, model, plugin = self.quantized(manager)
        first = {n: plugin.plugin.dequantize_weight(m).float() for n, m in self.quantized_layers(model, plugin).items()}
        again = models.load_model(self.base, torch.float32)
        with torch.no_grad():
            for name, weight in first.items():
                again.get_submodule(name).weight.copy_(weight)
        apply_quantizer(again, plugin)
        second = self.quantized_layers(again, plugin)
        assert set(second) == set(first)
        for name, weight in first.items():
            error = relative_error(plugin.plugin.dequantize_weight(second[name]), weight)
            assert error <= self.roundtrip_tolerance, f"{name}: round trip moved the weights by {error:.4f}"

    def test_logits_stay_close_to_dense(self, manager: PluginManager) -> None:
        """The quantized model's logits are within :attr:`max_logit_error` of the dense model's."""
        dense, model, _ = self.quantized(manager)
        batch = sample_batch(self.tokenizer())
        error = relative_error(logits_of(model, batch), logits_of(dense, batch))
        assert 0 < error <= self.max_logit_error, f"relative logit error {error:.4f}"

    def test_deltas_train_merge_and_reload_on_top(self, manager: PluginManager, tmp_path: Path) -> None:
        """The delta method :attr:`delta` trains on the quantized base, merges, and its adapter reloads."""
        from deltatune.io.adapter import load_adapter, save_adapter
        from deltatune.model.assembly import build_model, resolve_spec

        if self.delta is None:
            pytest.skip(f"{type(self).__name__} sets no `delta` method to train on the quantized base")
        assert self.delta["name"] in manager.names("delta_method"), f"needs the '{self.delta['name']}' delta method"
        ref = {"name": self.quantizer_name, "config": dict(self.config)}
        # base_dtype auto, as runs use it: frozen weights in the compute dtype the quantizer picks
        resolved = resolve_spec({"base": self.base, "quantizer": ref, "delta": [self.delta], "base_dtype": "auto"},
                                manager)
        model = build_model(resolved)
        batch = sample_batch(self.tokenizer())
        before = snapshot(model)
        model.train()
        loss = training_loss(model, batch)
        loss.backward()
        trained = {n for n, p in model.named_parameters() if p.grad is not None}
        assert trained and all(".deltas." in n for n in trained), f"gradients reached {sorted(trained)[:3]}"
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.add_(param.grad, alpha=-0.5)
                    param.grad = None
        model.eval()
        after = dict(model.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in before if n not in trained), "quantized weights changed"
        reference = logits_of(model, batch)
        save_adapter(model, resolved, tmp_path / "adapter")
        reloaded, _ = load_adapter(tmp_path / "adapter", manager=manager)
        torch.testing.assert_close(logits_of(reloaded, batch), reference, rtol=1e-5, atol=1e-5)
        for delta in resolved.deltas:
            delta.plugin.merge(model)
        merged = logits_of(model, batch)
        assert relative_error(merged, reference) <= self.layer_tolerance, "merging onto the dequantized base changed logits"
