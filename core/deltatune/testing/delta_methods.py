"""The contract of delta methods: :class:`DeltaMethodContract`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from deltatune.deltas.layer import is_quantized
from deltatune.errors import ConfigError
from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.resolve import resolve
from deltatune.testing.contract import PluginContract
from deltatune.testing.helpers import logits_of, sample_batch, snapshot, training_loss


class DeltaMethodContract(PluginContract):
    """The contract of a delta method (:class:`deltatune.plugin.protocols.DeltaMethod`).

    Checked on :attr:`base` (fp32) with :attr:`config`:

    * only the parameters the method claims train, each claimed parameter receives a gradient, and a
      training step changes nothing else; none is a weight matrix of the base model (unless
      :attr:`trains_base_weights`); its ``state_dict`` holds every parameter it trains (with
      :attr:`saves_computed`: finite tensors computed from them instead);
    * at initialisation the outputs equal the base model's when :attr:`promises_identity_at_init`
      (else they are finite and of the same shape);
    * ``merge`` keeps the outputs, and ``unmerge`` restores the base weights (up to float rounding);
      a method whose plugin declares ``mergeable = False`` must refuse ``merge`` with a :class:`ConfigError` naming
      itself and leave the outputs unchanged;
    * an adapter saved with :func:`deltatune.io.adapter.save_adapter` and loaded with
      :func:`~deltatune.io.adapter.load_adapter` reproduces the logits;
    * with :attr:`compose_with` (another delta method on other modules) it composes in either order:
      the two claim disjoint parameters, both train, and merge and save/reload still hold; with
      ``compose_with = None`` (the default) the method listed twice must be refused;
    * with :attr:`quantizer` (a quantizer reference; its plugin must be installed): when the method's
      ``supports_quantized`` is true it trains and reloads on that quantized base, with the outputs
      of the quantized base at initialisation when it promises identity; otherwise the core refuses
      the combination, naming both. Without :attr:`quantizer` that test is skipped, saying so.
    """

    kind: ClassVar[str] = "delta_method"
    method_name: ClassVar[str] = ""
    promises_identity_at_init: ClassVar[bool] = True
    quantizer: ClassVar[dict[str, Any] | None] = None
    """The quantizer (``{"name": ..., "config": {...}}``) the method is checked on top of."""
    compose_with: ClassVar[dict[str, Any] | None] = None
    """Another delta method (a plugin reference, on modules this one leaves alone) to compose with."""
    trains_base_weights: ClassVar[bool] = False
    """Whether the method trains weight matrices of the base model itself (not its own tensors);
    biases and norms (1-D) are always allowed."""
    saves_computed: ClassVar[bool] = False
    """Whether ``state_dict`` saves tensors computed from the trained parameters instead of them (an
    encoder dropped at save, as prefix-tuning's reparameterisation MLP); the reload check still holds."""
    perturbation: ClassVar[float] = 0.05
    """Standard deviation of the noise added to trained tensors, so that deltas are not trivial."""
    merge_tolerance: ClassVar[float] = 1e-4
    """Largest logit change allowed by merge (relative to the largest logit)."""

    # -- helpers ----------------------------------------------------------------------------------
    def spec(self, deltas: list[dict[str, Any]], quantizer: dict[str, Any] | None = None) -> dict[str, Any]:
        """A model spec on :attr:`base` with fp32 weights."""
        return {"base": self.base, "delta": deltas, "quantizer": quantizer, "base_dtype": "fp32"}

    def own_ref(self) -> dict[str, Any]:
        """This method as a plugin reference."""
        return {"name": self.method_name, "config": dict(self.config)}

    def build(self, manager: PluginManager, deltas: list[dict[str, Any]] | None = None,
              quantizer: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
        """``(model, resolved spec)`` built by the core's pipeline."""
        from deltatune.model.assembly import build_model, resolve_spec

        try:
            resolved = resolve_spec(self.spec(deltas or [self.own_ref()], quantizer), manager)
        except ConfigError as exc:
            failures = "; ".join(f"{f.distribution}: {f.error}" for f in manager.failures)
            raise AssertionError(f"{exc}\nplugins that failed to load: {failures or 'none'}") from None
        return build_model(resolved), resolved

    def perturb(self, model: nn.Module, seed: int = 0) -> None:
        """Add seeded noise to every trainable tensor (so deltas are not zero)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * self.perturbation)

    def train_step(self, model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 0.1) -> float:
        """One SGD step on the trainable parameters; returns the loss before it."""
        model.train()
        loss = training_loss(model, batch)
        assert torch.isfinite(loss), f"loss is {loss}"
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.add_(param.grad.to(param.dtype), alpha=-lr)
                    param.grad = None
        model.eval()
        return float(loss.detach())

    def check_claims(self, model: nn.Module, resolved: Any, batch: dict[str, torch.Tensor]) -> dict[str, str]:
        """Trainable = claimed, every claimed parameter gets a gradient, a step changes only those."""
        owners: dict[str, str] = {}
        for name, param in model.named_parameters():
            claimers = [d.name for d in resolved.deltas if d.plugin.trainable(name, param)]
            assert len(claimers) <= 1, f"{name} is claimed by {claimers}"
            assert param.requires_grad == bool(claimers), (
                f"{name}: requires_grad={param.requires_grad} but claimed by {claimers or 'nobody'}")
            if claimers:
                owners[name] = claimers[0]
        for delta in resolved.deltas:
            assert delta.name in owners.values(), f"'{delta.name}' claims no parameter with config {delta.cfg}"
        if not self.trains_base_weights:
            base = {n for n, p in models.load_model(self.base, torch.float32).named_parameters() if p.ndim >= 2}
            moved = {n.replace(".base_layer.", ".") for n in owners}
            foreign = sorted(n for n in moved if n in base)
            assert not foreign, f"trains weight matrices of the base model: {foreign[:5]} (trains_base_weights = False)"
        total = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) < total, "everything trains"
        before = snapshot(model)
        model.train()
        training_loss(model, batch).backward()
        for name, param in model.named_parameters():
            if name in owners:
                assert param.grad is not None, f"{name} is trainable but receives no gradient"
            else:
                assert param.grad is None, f"{name} is frozen but received a gradient"
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.add_(param.grad.to(param.dtype), alpha=-0.1)
                    param.grad = None
        model.eval()
        after = dict(model.named_parameters())
        changed = {n for n, v in before.items() if not torch.equal(v, after[n].detach())}
        assert changed <= set(owners), f"a training step changed frozen parameters: {sorted(changed - set(owners))[:5]}"
        for delta in resolved.deltas:
            mine = {n for n, o in owners.items() if o == delta.name}
            assert changed & mine, f"a training step changed none of '{delta.name}''s parameters"
        return owners

    def check_merge(self, model: nn.Module, resolved: Any, batch: dict[str, torch.Tensor]) -> None:
        """Merge keeps the logits; unmerge restores base weights and logits."""
        reference = logits_of(model, batch)
        own = next(d for d in resolved.deltas if d.name == self.method_name)
        if not own.optional("mergeable"):
            with pytest.raises(ConfigError, match=re.escape(self.method_name)):
                own.plugin.merge(model)
            torch.testing.assert_close(logits_of(model, batch), reference, rtol=0, atol=0)
            return
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        for delta in resolved.deltas:
            delta.plugin.merge(model)
        merged = logits_of(model, batch)
        scale = reference.abs().max().clamp_min(1.0)
        assert (merged - reference).abs().max() <= self.merge_tolerance * scale, (
            f"merge changed the logits by {float((merged - reference).abs().max()):.3g}")
        for delta in reversed(resolved.deltas):
            delta.plugin.unmerge(model)
        params = dict(model.named_parameters())
        for name, value in frozen.items():
            assert name in params, f"unmerge did not restore parameter {name}"
            torch.testing.assert_close(params[name].detach(), value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"unmerge did not restore {n}: {m}")
        torch.testing.assert_close(logits_of(model, batch), reference, rtol=1e-4, atol=1e-4 * float(scale))

    def check_reload(self, model: nn.Module, resolved: Any, batch: dict[str, torch.Tensor], folder: Path,
                     manager: PluginManager) -> None:
        """Save the adapter and load it into a fresh model: identical logits."""
        from deltatune.io.adapter import load_adapter, read_manifest, save_adapter

        save_adapter(model, resolved, folder)
        names = [d["name"] for d in read_manifest(folder)["delta"]]
        assert names == [d.name for d in resolved.deltas]
        reloaded, _ = load_adapter(folder, manager=manager)
        torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), rtol=1e-5, atol=1e-5)

    # -- tests ------------------------------------------------------------------------------------
    def test_only_its_own_parameters_train(self, manager: PluginManager) -> None:
        """Exactly the claimed parameters require grad, get gradients and change in a step, and
        ``state_dict`` holds every one of them."""
        model, resolved = self.build(manager)
        owners = self.check_claims(model, resolved, sample_batch(self.tokenizer()))
        state = resolved.deltas[0].plugin.state_dict(model)
        if self.saves_computed:
            assert state and all(torch.isfinite(v).all() for v in state.values()), "state_dict saves no finite tensor"
            return
        assert set(owners) <= set(state), f"state_dict lacks trained tensors: {sorted(set(owners) - set(state))[:5]}"
        keys = set(model.state_dict())
        assert set(state) <= keys, f"state_dict has keys the model lacks: {sorted(set(state) - keys)[:5]}"

    def test_outputs_at_initialisation(self, manager: PluginManager) -> None:
        """Unchanged outputs at initialisation when promised, else finite outputs of the same shape."""
        batch = sample_batch(self.tokenizer())
        base = logits_of(models.load_model(self.base, torch.float32), batch)
        model, _ = self.build(manager)
        logits = logits_of(model, batch)
        assert logits.shape == base.shape and torch.isfinite(logits).all()
        if self.promises_identity_at_init:
            torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"a fresh '{self.method_name}' changes the outputs: {m}")

    def test_merge_and_unmerge_are_exact(self, manager: PluginManager) -> None:
        """``merge`` keeps the outputs of a trained (perturbed) method; ``unmerge`` undoes it."""
        model, resolved = self.build(manager)
        self.perturb(model)
        self.check_merge(model, resolved, sample_batch(self.tokenizer()))

    def test_save_and_reload_reproduce_logits(self, manager: PluginManager, tmp_path: Path) -> None:
        """An adapter bundle of a trained (perturbed) method reloads with the same logits."""
        model, resolved = self.build(manager)
        self.perturb(model)
        self.check_reload(model, resolved, sample_batch(self.tokenizer()), tmp_path / "adapter", manager)

    def test_composes_with_another_method(self, manager: PluginManager, tmp_path: Path) -> None:
        """With :attr:`compose_with` on other modules, in both orders: disjoint claims, both train,
        merge and reload hold. With ``compose_with = None``, listing the method twice is refused."""
        batch = sample_batch(self.tokenizer())
        if self.compose_with is None:
            from deltatune.model.assembly import resolve_spec

            with pytest.raises(ConfigError, match=re.escape(self.method_name)):
                resolve_spec(self.spec([self.own_ref(), self.own_ref()]), manager)
            return
        for order, deltas in enumerate(([self.own_ref(), self.compose_with], [self.compose_with, self.own_ref()])):
            model, resolved = self.build(manager, deltas)
            self.check_claims(model, resolved, batch)
            self.perturb(model, seed=order)
            self.check_merge(model, resolved, batch)
            self.check_reload(model, resolved, batch, tmp_path / f"adapter-{order}", manager)

    def test_on_a_quantized_base(self, manager: PluginManager, tmp_path: Path) -> None:
        """Trains and reloads on :attr:`quantizer`'s base when the method ``supports_quantized``; else
        is refused, naming both."""
        from deltatune.model.assembly import apply_quantizer, resolve_spec

        if self.quantizer is None:
            pytest.skip(f"{type(self).__name__} sets no `quantizer` to check the method on a quantized base")
        quantizer = {"name": self.quantizer["name"], "config": dict(self.quantizer.get("config", {}))}
        assert quantizer["name"] in manager.names("quantizer"), f"needs the '{quantizer['name']}' quantizer installed"
        plugin = self.resolved(manager).plugin
        if not plugin.supports_quantized:
            with pytest.raises(ConfigError) as error:
                resolve_spec(self.spec([self.own_ref()], quantizer), manager)
            assert self.method_name in str(error.value) and quantizer["name"] in str(error.value)
            return
        batch = sample_batch(self.tokenizer())
        model, resolved = self.build(manager, quantizer=quantizer)
        assert any(is_quantized(m) for m in model.modules()), "no layer was quantized"
        if self.promises_identity_at_init:
            base = models.load_model(self.base, torch.float32)
            apply_quantizer(base, resolve("quantizer", quantizer, manager))
            torch.testing.assert_close(logits_of(model, batch), logits_of(base, batch), rtol=1e-4, atol=1e-4)
        self.check_claims(model, resolved, batch)
        loss = self.train_step(model, batch)
        assert math.isfinite(loss)
        self.perturb(model)
        self.check_reload(model, resolved, batch, tmp_path / "adapter", manager)
