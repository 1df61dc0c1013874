"""deltatune's pytest plugin: fixtures and contract tests for plugin authors.

The core registers this module with pytest through the ``pytest11`` entry point, so in any
environment where ``deltatune`` is installed, pytest knows these fixtures:

``tiny_model``
    a fresh random 2-layer Llama (:func:`deltatune.model.loading.tiny_llama`, fp32, seed 0, eval mode);
``tiny_tokenizer``
    the byte-level tokenizer that goes with it (ChatML template included);
``plugin_manager``
    an isolated :class:`deltatune.plugin.manager.PluginManager` loaded from the installed entry points (not
    the process-wide one): call ``plugin_manager.register_module(module)`` to add a plugin module
    in-process, without installing it;
``make_plugin_manager``
    a factory, ``make_plugin_manager(module, ..., entry_points_too=True)``, for a manager holding the
    given in-process modules (their own installed entry points, if any, are left out so nothing is
    registered twice).

and gives every plugin kind a *contract*: a class of tests that every plugin of that kind must pass.
A plugin's test suite subclasses it, says which plugin to test, and inherits the tests::

    from deltatune.testing import DeltaMethodContract

    class TestIA3Contract(DeltaMethodContract):
        method_name = "ia3"
        config = {"targets": ["k_proj", "v_proj", "down_proj"]}
        promises_identity_at_init = True   # a fresh IA3 leaves the model's outputs unchanged
        supports_nf4 = True                # and it sits on a 4-bit base

The contracts are :class:`DeltaMethodContract`, :class:`DatasetBuilderContract`,
:class:`EvaluatorContract`, :class:`QuantizerContract` and :class:`OptimizerContract`
(:data:`CONTRACTS` maps each plugin kind to its contract). Each runs the plugin through the real core
(:func:`deltatune.model.assembly.resolve_spec` / :func:`~deltatune.model.assembly.build_model`,
:func:`deltatune.io.adapter.save_adapter` / :func:`~deltatune.io.adapter.load_adapter`) on the tiny model,
with a manager that holds the installed plugins — or, when the subclass sets ``plugin_module``
(a module or its import name), that module registered in-process. Every test of a contract checks
something; the flags (``promises_identity_at_init``, ``supports_nf4``, ``compose_with``, …) choose
*what* is checked, never whether: a method that does not support NF4 is checked to refuse it with a
clear error, for example. ``docs/plugin-authoring.md`` is the manual.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from deltatune.deltas.layer import is_quantized

from deltatune.model import loading as models
from deltatune.plugin.resolve import resolve
from deltatune.errors import ConfigError, DataError
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.protocols import PLUGIN_KINDS, Row, optional_member_problems
from deltatune.train.update_in_backward import optimizer_updates_in_backward

__all__ = [
    "CONTRACTS",
    "DatasetBuilderContract",
    "DeltaMethodContract",
    "EvaluatorContract",
    "OptimizerContract",
    "PluginContract",
    "QuantizerContract",
    "fast_forward_runs",
    "isolated_manager",
    "logits_of",
    "max_parameter_difference",
    "max_relative_difference",
    "token_batches",
    "sample_batch",
    "sample_rows",
]

SAMPLE_TEXTS = (
    "Reverse the order of these words: red fox jumps",
    "What is 17 plus 25? The answer is 42.",
    "Name three colours: red, green and blue.",
    "The quick brown fox jumps over the lazy dog.",
)


# -- helpers --------------------------------------------------------------------------------------
def _import(module: ModuleType | str) -> ModuleType:
    return importlib.import_module(module) if isinstance(module, str) else module


def isolated_manager(*modules: ModuleType | str, entry_points_too: bool = True, strict: bool = False) -> PluginManager:
    """A new :class:`PluginManager` (never the process-wide one).

    It loads every installed ``deltatune`` entry point (unless ``entry_points_too`` is false), except
    those that point at one of ``modules``, and then registers ``modules`` in-process (distribution
    ``<in-process>``), so a plugin under development is tested as it is in the working tree.
    """
    loaded = [_import(m) for m in modules]
    names = {m.__name__ for m in loaded}
    manager = PluginManager(strict=strict)
    if entry_points_too:
        own = {ep.name for ep in entry_points(group="deltatune") if ep.value.split(":")[0] in names}
        manager.load_entry_points(deny=own)
    for module in loaded:
        manager.register_module(module)
    return manager


def sample_batch(tokenizer: Any, texts: tuple[str, ...] | list[str] = SAMPLE_TEXTS) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``texts`` (``input_ids``, ``attention_mask``, ``labels`` = the tokens,
    -100 on padding), as the core's collator builds it."""
    from deltatune.data.module import collate

    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return collate(rows, tokenizer.pad_token_id)


def sample_rows(tokenizer: Any) -> list[Row]:
    """Evaluation rows like a dataset builder makes them: masked prompt, ``prompt``/``response``
    text, and ``choices``/``answer_index`` for multiple-choice evaluators."""
    from deltatune.data.module import encode_example
    from deltatune.model.generation import chat_prompt

    examples = [
        ("Reverse the order of these words: red fox jumps", "jumps fox red", ["jumps fox red", "red fox jumps"], 0),
        ("What is 17 plus 25?", "42", ["24", "42"], 1),
        ("Name a primary colour.", "red", ["red", "purple"], 0),
        ("Capital of France?", "Paris", ["Rome", "Paris"], 1),
    ]
    rows = []
    for prompt, response, choices, answer in examples:
        row = encode_example(tokenizer, chat_prompt(tokenizer, prompt), response, 128)
        row.update(choices=choices, answer_index=answer)
        rows.append(row)
    return rows


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` on ``batch`` in eval mode without autograd, under the compute dtype
    the core uses for that model."""
    from deltatune.model.assembly import compute_context, eval_mode

    with eval_mode(model), torch.no_grad(), compute_context(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out.float()


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from deltatune.train.loss import mean_loss
    from deltatune.model.assembly import compute_context

    with compute_context(model):
        return mean_loss(model, batch)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms), in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of ``a`` and ``b`` relative to the largest magnitude of
    ``b`` (in fp32): the tolerance measure of oracle tests (logits, weights, gradients)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def max_parameter_difference(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute difference between the parameters of two copies of one model (in fp32):
    whether, and how far, two optimizers moved the same start apart."""
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def token_batches(count: int, seed: int = 0, shape: tuple[int, int] = (2, 16), vocab: int = 200) -> list[torch.Tensor]:
    """``count`` seeded batches of random token ids (``shape``, ids below ``vocab``): the same
    data for an optimizer and its reference."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=generator) for _ in range(count)]


@contextlib.contextmanager
def fast_forward_runs() -> Iterator[list[str]]:
    """Within the block, the model type of every batch a fast training forward computed
    (:mod:`deltatune.train.fast`) is appended to the yielded list, so a test comparing the fast and
    the plain path can assert that the fast one really ran rather than silently falling back."""
    from deltatune.train import fast

    runs: list[str] = []
    find = fast.fast_forward

    def counting(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], Any] | None:
        forward = find(model)
        if forward is None:
            return None

        def run(batch: dict[str, torch.Tensor]) -> Any:
            result = forward(batch)
            if result is not None:
                runs.append(model.config.model_type)
            return result

        return run

    fast.fast_forward = counting
    try:
        yield runs
    finally:
        fast.fast_forward = find


def _through_bytes(state: Any) -> Any:
    """``state`` saved with :func:`torch.save` and loaded back (as a checkpoint would be)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


_TINY_FOLDERS: dict[str, str] = {}


def _tiny_base_folder(factory: pytest.TempPathFactory, overrides: dict[str, Any]) -> str:
    """A Hugging Face folder holding ``tiny_llama(**overrides)`` and the tiny tokenizer (once per session)."""
    key = json.dumps(overrides, sort_keys=True)
    if key not in _TINY_FOLDERS or not Path(_TINY_FOLDERS[key], "config.json").is_file():
        folder = factory.mktemp("tiny-base")
        models.tiny_llama(**overrides).save_pretrained(folder, safe_serialization=True)
        models.tiny_tokenizer().save_pretrained(folder)
        _TINY_FOLDERS[key] = str(folder)
    return _TINY_FOLDERS[key]


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers deltatune's test suites use."""
    config.addinivalue_line(
        "markers", "measured: measures this machine (peak memory of real runs in fresh processes); slower")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def tiny_tokenizer() -> Any:
    """The byte-level tokenizer of the tiny test models."""
    return models.tiny_tokenizer()


@pytest.fixture
def tiny_model() -> nn.Module:
    """A fresh random 2-layer Llama (fp32, seed 0, eval mode): ``deltatune.model.loading.tiny_llama()``."""
    return models.tiny_llama()


@pytest.fixture
def plugin_manager() -> PluginManager:
    """An isolated plugin manager loaded from the installed entry points; add in-process plugins
    with ``plugin_manager.register_module(module)``."""
    return isolated_manager()


@pytest.fixture
def make_plugin_manager() -> Callable[..., PluginManager]:
    """``make_plugin_manager(*modules, entry_points_too=True, strict=False)``: see :func:`isolated_manager`."""
    return isolated_manager


# -- contracts ------------------------------------------------------------------------------------
class PluginContract:
    """What every plugin class must do, whatever its kind. Subclasses set :attr:`kind`."""

    kind: ClassVar[str]
    config: ClassVar[dict[str, Any]] = {}
    """Options the plugin is tested with (validated by its ``Config``)."""
    plugin_module: ClassVar[ModuleType | str | None] = None
    """Register this module in-process instead of relying on an installed entry point."""
    base: ClassVar[str] = "tiny-llama"
    """The base model the contract builds (a built-in name or a local folder)."""
    tiny_overrides: ClassVar[dict[str, Any]] = {}
    """When set, the base is instead a tiny Llama with these config changes
    (``deltatune.model.loading.tiny_llama(**tiny_overrides)``), saved once per session to a folder."""

    @property
    def plugin_name(self) -> str:
        """The registered name under test (``method_name``, ``builder_name``, … of the subclass)."""
        attribute = PLUGIN_KINDS[self.kind].tested_name
        name = getattr(self, attribute, None)
        if not name:
            raise TypeError(f"{type(self).__name__} must set `{attribute}` (the registered name to test)")
        return name

    @pytest.fixture
    def manager(self, tmp_path_factory: pytest.TempPathFactory) -> PluginManager:
        """The isolated manager the contract runs against (it also prepares :attr:`tiny_overrides`)."""
        if self.tiny_overrides:
            self.base = _tiny_base_folder(tmp_path_factory, self.tiny_overrides)
        modules = [self.plugin_module] if self.plugin_module is not None else []
        return isolated_manager(*modules)

    def resolved(self, manager: PluginManager, config: dict[str, Any] | None = None) -> Any:
        """The plugin under test, resolved with ``config`` (default :attr:`config`)."""
        try:
            return resolve(self.kind, {"name": self.plugin_name, "config": self.options() if config is None else config},
                           manager)
        except ConfigError as exc:
            failures = "; ".join(f"{f.distribution} ({f.source}): {f.error}" for f in manager.failures)
            raise AssertionError(f"{exc}\nplugins that failed to load: {failures or 'none'}") from None

    def options(self) -> dict[str, Any]:
        """The options the registration tests resolve the plugin with (default :attr:`config`)."""
        return dict(self.config)

    def tokenizer(self) -> Any:
        """The tokenizer of :attr:`base`."""
        return models.load_tokenizer(self.base)

    def test_registered_and_follows_its_protocol(self, manager: PluginManager) -> None:
        """Registered under its name, an instance satisfies the protocol (and the optional members it
        has are of the declared shape), ``Config`` forbids unknown options, and :attr:`config` is valid."""
        plugin = self.resolved(manager)
        protocol = PLUGIN_KINDS[self.kind].protocol
        assert isinstance(plugin.plugin, protocol), f"{plugin.info.cls.__qualname__} does not follow {protocol.__name__}"
        assert optional_member_problems(self.kind, plugin.info.cls) == []
        assert plugin.info.cls.Config.model_config.get("extra") == "forbid"
        assert plugin.name == self.plugin_name

    def test_unknown_option_is_an_error_naming_plugin_and_option(self, manager: PluginManager) -> None:
        """A misspelt option fails resolution with a message naming the plugin and the option."""
        with pytest.raises(ConfigError) as error:
            resolve(self.kind, {"name": self.plugin_name, "config": {**self.options(), "no_such_option": 1}}, manager)
        assert self.plugin_name in str(error.value) and "no_such_option" in str(error.value)


# .. delta methods ................................................................................
class DeltaMethodContract(PluginContract):
    """The contract of a delta method (:class:`deltatune.plugin.protocols.DeltaMethod`).

    Checked on :attr:`base` (fp32) with :attr:`config`:

    * only the parameters the method claims train, each claimed parameter receives a gradient, and a
      training step changes nothing else; none is a weight matrix of the base model (unless
      :attr:`trains_base_weights`); its ``state_dict`` holds every parameter it trains;
    * at initialisation the outputs equal the base model's when :attr:`promises_identity_at_init`
      (else they are finite and of the same shape);
    * ``merge`` keeps the outputs, and ``unmerge`` restores the base weights (up to float rounding);
    * an adapter saved with :func:`deltatune.io.adapter.save_adapter` and loaded with
      :func:`~deltatune.io.adapter.load_adapter` reproduces the logits;
    * it composes with :attr:`compose_with` (LoRA on other modules by default) in either order: the
      two claim disjoint parameters, both train, and merge and save/reload still hold; with
      ``compose_with = None`` (LoRA itself) the method listed twice must be refused;
    * when :attr:`supports_nf4` it trains and reloads on an NF4 base (``deltatune-nf4`` needed),
      with the outputs of the NF4 base at initialisation when it promises identity; otherwise
      ``supports_quantized`` is false and the core refuses the combination, naming both.
    """

    kind: ClassVar[str] = "delta_method"
    method_name: ClassVar[str] = ""
    promises_identity_at_init: ClassVar[bool] = True
    supports_nf4: ClassVar[bool] = True
    nf4_config: ClassVar[dict[str, Any]] = {}
    compose_with: ClassVar[dict[str, Any] | None] = {"name": "lora", "config": {"targets": ["o_proj"]}}
    trains_base_weights: ClassVar[bool] = False
    """Whether the method trains weight matrices of the base model itself (not its own tensors);
    biases and norms (1-D) are always allowed."""
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
        loss = _loss(model, batch)
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
        before = _snapshot(model)
        model.train()
        _loss(model, batch).backward()
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

    def test_on_an_nf4_base(self, manager: PluginManager, tmp_path: Path) -> None:
        """Trains and reloads on an NF4 base when :attr:`supports_nf4`; else is refused, naming both."""
        from deltatune.model.assembly import apply_quantizer, resolve_spec

        quantizer = {"name": "nf4", "config": dict(self.nf4_config)}
        plugin = self.resolved(manager).plugin
        if not self.supports_nf4:
            assert plugin.supports_quantized is False, "supports_nf4 = False but supports_quantized is not False"
            with pytest.raises(ConfigError) as error:
                resolve_spec(self.spec([self.own_ref()], quantizer), manager)
            assert self.method_name in str(error.value) and "nf4" in str(error.value)
            return
        assert "nf4" in manager.names("quantizer"), "the NF4 contract needs deltatune-nf4 installed"
        assert plugin.supports_quantized is True
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


# .. dataset builders .............................................................................
class DatasetBuilderContract(PluginContract):
    """The contract of a dataset builder (:class:`deltatune.plugin.protocols.DatasetBuilder`).

    The subclass gives :attr:`records` (valid examples) and :attr:`malformed` (each one bad example),
    and overrides :meth:`write` / :meth:`make_config` when its files are not JSONL with a ``path``
    option. Checked:

    * ``build(cfg, tokenizer, "train")`` gives one row per record (when :attr:`one_row_per_record`;
      else at least one row), each with ``input_ids`` and ``labels`` of equal length, every label
      ``-100`` or the token at its position;
    * when :attr:`masks_prompt`, the prompt is masked: the first label is ``-100``, and the labelled
      tokens spell the row's ``response``; when also :attr:`prompt_fully_masked`, every token of the
      row's ``prompt`` is masked. A builder for continued pre-training (``masks_prompt = False``)
      must label every token instead;
    * a file with a malformed record raises :class:`deltatune.errors.DataError` naming the file and
      the line (:meth:`bad_line`);
    * a split with no data is ``None``;
    * the rows go through the core's collator into a finite loss of the tiny model.
    """

    kind: ClassVar[str] = "dataset_builder"
    builder_name: ClassVar[str] = ""
    records: ClassVar[list[Any]] = []
    malformed: ClassVar[list[Any]] = []
    suffix: ClassVar[str] = ".jsonl"
    one_row_per_record: ClassVar[bool] = True
    masks_prompt: ClassVar[bool] = True
    prompt_fully_masked: ClassVar[bool] = True

    def write(self, path: Path, records: list[Any]) -> None:
        """Write ``records`` to ``path`` (JSONL; a string record is written as the raw line)."""
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def make_config(self, path: Path) -> dict[str, Any]:
        """The builder's options for a training file ``path``."""
        return {**self.config, "path": str(path)}

    def options(self) -> dict[str, Any]:
        """Options for a (not yet written) training file."""
        return self.make_config(Path(f"data{self.suffix}"))

    def bad_line(self, path: Path, index: int) -> int:
        """The line (1-based) the error must name for a malformed record after ``index`` good ones."""
        return index + 1

    def build(self, manager: PluginManager, tmp_path: Path, records: list[Any], split: str = "train") -> Any:
        """Write ``records`` and build ``split``; returns ``(rows, path)``."""
        assert self.records, f"{type(self).__name__} must set `records` (valid examples)"
        path = tmp_path / f"data{self.suffix}"
        self.write(path, records)
        plugin = self.resolved(manager, self.make_config(path))
        return plugin.plugin.build(plugin.cfg, self.tokenizer(), split), path

    def test_rows_are_tokenised_with_aligned_labels(self, manager: PluginManager, tmp_path: Path) -> None:
        """One row per record; ``input_ids``/``labels`` of equal length; labels are -100 or the token."""
        rows, _ = self.build(manager, tmp_path, list(self.records))
        assert isinstance(rows, list) and rows, "no rows"
        if self.one_row_per_record:
            assert len(rows) == len(self.records), f"{len(rows)} rows from {len(self.records)} records"
        for row in rows:
            ids, labels = row["input_ids"], row["labels"]
            assert len(ids) == len(labels) > 0
            assert all(isinstance(t, int) for t in ids) and all(isinstance(t, int) for t in labels)
            assert all(label in (-100, token) for label, token in zip(labels, ids)), "a label is neither -100 nor its token"
            assert any(label != -100 for label in labels), "a row has no labelled token"

    def test_labels_mask_the_prompt_or_cover_every_token(self, manager: PluginManager, tmp_path: Path) -> None:
        """The loss covers the response, not the prompt (or, without :attr:`masks_prompt`, every token)."""
        tokenizer = self.tokenizer()
        rows, _ = self.build(manager, tmp_path, list(self.records))
        for row in rows:
            labels = row["labels"]
            if not self.masks_prompt:
                assert labels == row["input_ids"], "a pre-training builder must label every token"
                continue
            assert labels[0] == -100, "the first token (prompt) carries a label"
            labelled = [t for t in labels if t != -100]
            if row.get("response"):
                text = tokenizer.decode(labelled, skip_special_tokens=True)
                assert row["response"].strip() in text, f"labelled text {text!r} lacks the response {row['response']!r}"
            if self.prompt_fully_masked and row.get("prompt"):
                count = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
                if row["input_ids"][:count] == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]:
                    assert all(t == -100 for t in labels[:count]), "a prompt token carries a label"

    def test_malformed_records_are_reported_with_file_and_line(self, manager: PluginManager, tmp_path: Path) -> None:
        """Each malformed record raises :class:`DataError` naming the file and the line."""
        assert self.malformed, f"{type(self).__name__} must set `malformed` (bad examples)"
        for number, bad in enumerate(self.malformed):
            folder = tmp_path / f"bad{number}"
            folder.mkdir()
            with pytest.raises(DataError) as error:
                self.build(manager, folder, [*self.records, bad])
            path = folder / f"data{self.suffix}"
            line = self.bad_line(path, len(self.records))
            message = str(error.value)
            assert path.name in message, f"the error does not name the file: {message}"
            assert re.search(rf"(?<!\d){line}(?!\d)", message), f"the error does not name line {line}: {message}"

    def test_missing_split_is_none(self, manager: PluginManager, tmp_path: Path) -> None:
        """A split the configuration gives no data for is ``None`` (the core then holds out rows)."""
        rows, _ = self.build(manager, tmp_path, list(self.records), split="test")
        assert rows is None

    def test_rows_collate_into_a_finite_loss(self, manager: PluginManager, tmp_path: Path) -> None:
        """The core's collator batches the rows and the tiny model computes a finite loss on them."""
        from deltatune.data.module import collate

        rows, _ = self.build(manager, tmp_path, list(self.records))
        tokenizer = self.tokenizer()
        batch = collate(rows, tokenizer.pad_token_id)
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        model = models.load_model(self.base, torch.float32)
        assert torch.isfinite(_loss(model, batch))


# .. evaluators ...................................................................................
class EvaluatorContract(PluginContract):
    """The contract of an evaluator (:class:`deltatune.plugin.protocols.Evaluator`).

    Checked on the tiny model, called as the core calls it (eval mode, ``torch.no_grad``), on
    :meth:`make_rows` (default :func:`sample_rows`): it returns a non-empty flat ``dict[str, float]``
    of finite values including :attr:`expected_metrics`; two calls agree; it changes no parameter and
    leaves no gradient; it works on a model wrapped by delta methods (:attr:`wrapped_with`).
    """

    kind: ClassVar[str] = "evaluator"
    evaluator_name: ClassVar[str] = ""
    expected_metrics: ClassVar[set[str]] = set()
    wrapped_with: ClassVar[dict[str, Any] | None] = {"name": "lora", "config": {"targets": "all-linear"}}

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
        before = _snapshot(model)
        first, second = self.run(manager, model), self.run(manager, model)
        assert first == second
        for name, param in model.named_parameters():
            assert torch.equal(param, before[name]), f"evaluation changed {name}"
            assert param.grad is None, f"evaluation left a gradient on {name}"

    def test_works_on_a_delta_wrapped_model(self, manager: PluginManager) -> None:
        """Works on a model built by the pipeline with :attr:`wrapped_with` (LoRA by default)."""
        from deltatune.model.assembly import build_model, resolve_spec

        deltas = [self.wrapped_with] if self.wrapped_with else []
        model = build_model(resolve_spec({"base": self.base, "delta": deltas, "base_dtype": "fp32"}, manager))
        plain = self.run(manager, models.load_model(self.base, torch.float32))
        wrapped = self.run(manager, model)
        assert set(wrapped) == set(plain)
        assert all(math.isfinite(v) for v in wrapped.values())


# .. quantizers ...................................................................................
class QuantizerContract(PluginContract):
    """The contract of a quantizer (:class:`deltatune.plugin.protocols.Quantizer`).

    Checked on the tiny model with :attr:`config`: ``quantize`` replaces linear layers only and
    ``is_quantized`` tells them apart; ``dequantize_weight`` has the layer's shape and is within
    :attr:`max_weight_error` (relative) of the dense weight; it is what the layer computes with;
    quantizing the dequantized weights again gives them back (within :attr:`roundtrip_tolerance`);
    the quantized model's logits stay within :attr:`max_logit_error` of the dense ones; and LoRA
    (``deltatune-lora``) trains on top, merges and reloads.
    """

    kind: ClassVar[str] = "quantizer"
    quantizer_name: ClassVar[str] = ""
    max_weight_error: ClassVar[float] = 0.15
    max_logit_error: ClassVar[float] = 0.25
    roundtrip_tolerance: ClassVar[float] = 0.01
    layer_tolerance: ClassVar[float] = 0.02
    delta: ClassVar[dict[str, Any]] = {"name": "lora", "config": {"targets": "all-linear"}}

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
            error = _relative(weight, original)
            assert error <= self.max_weight_error, f"{name}: relative weight error {error:.3f}"
            if module.in_features != x.shape[-1]:
                continue
            with torch.no_grad():
                out = module(x).float()
                bias = module.bias.float() if module.bias is not None else None
                expected = torch.nn.functional.linear(x, weight.float(), bias)
            assert _relative(out, expected) <= self.layer_tolerance, f"{name} does not compute with dequantize_weight"

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
            error = _relative(plugin.plugin.dequantize_weight(second[name]), weight)
            assert error <= self.roundtrip_tolerance, f"{name}: round trip moved the weights by {error:.4f}"

    def test_logits_stay_close_to_dense(self, manager: PluginManager) -> None:
        """The quantized model's logits are within :attr:`max_logit_error` of the dense model's."""
        dense, model, _ = self.quantized(manager)
        batch = sample_batch(self.tokenizer())
        error = _relative(logits_of(model, batch), logits_of(dense, batch))
        assert 0 < error <= self.max_logit_error, f"relative logit error {error:.4f}"

    def test_deltas_train_merge_and_reload_on_top(self, manager: PluginManager, tmp_path: Path) -> None:
        """A delta method (LoRA) trains on the quantized base, merges, and its adapter reloads."""
        from deltatune.io.adapter import load_adapter, save_adapter
        from deltatune.model.assembly import build_model, resolve_spec

        assert self.delta["name"] in manager.names("delta_method"), f"needs the '{self.delta['name']}' delta method"
        ref = {"name": self.quantizer_name, "config": dict(self.config)}
        # base_dtype auto, as runs use it: frozen weights in the compute dtype the quantizer picks
        resolved = resolve_spec({"base": self.base, "quantizer": ref, "delta": [self.delta], "base_dtype": "auto"},
                                manager)
        model = build_model(resolved)
        batch = sample_batch(self.tokenizer())
        before = _snapshot(model)
        model.train()
        loss = _loss(model, batch)
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
        assert _relative(merged, reference) <= self.layer_tolerance, "merging onto the dequantized base changed logits"


# .. optimizers ...................................................................................
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
        resumed.load_state_dict(_through_bytes(optimizer.state_dict()))
        if scheduler is not None:
            resumed_scheduler.load_state_dict(_through_bytes(scheduler.state_dict()))
        for _ in range(3):
            self.step(optimizer, scheduler, problem)
            self.step(resumed, resumed_scheduler, copy)
        torch.testing.assert_close(copy.weight.detach(), problem.weight.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(copy.bias.detach(), problem.bias.detach(), rtol=1e-6, atol=1e-7)


CONTRACTS: dict[str, type[PluginContract]] = {kind: globals()[spec.contract] for kind, spec in PLUGIN_KINDS.items()}
"""Plugin kind → its contract class (named in :data:`deltatune.plugin.protocols.PLUGIN_KINDS`)."""


def contract_subclasses(paths: list[Path]) -> Iterator[tuple[Path, str, str]]:
    """``(file, class name, contract name)`` for every class in the ``*.py`` files under ``paths``
    that subclasses a contract (by source text; used by the meta-tests)."""
    pattern = re.compile(r"^class\s+(\w+)\((\w+Contract)\)", re.MULTILINE)
    for root in paths:
        for file in sorted(Path(root).rglob("test_*.py")):
            for name, base in pattern.findall(file.read_text(encoding="utf-8")):
                yield file, name, base
