"""Plugin loading: entry points one by one, broken plugins reported and skipped, allow/deny lists."""

from __future__ import annotations

import pytest

from deltatune.errors import ConfigError, PluginError
from deltatune.plugin.manager import PluginManager, load_plugins
from deltatune.plugin.protocols import PLUGIN_KINDS, optional_member, required_members
from deltatune.plugin.resolve import resolve
from plugin_sources import GOOD

BROKEN_IMPORT = "raise RuntimeError('this plugin is broken on purpose')\n"

BAD_HOOK_SIGNATURE = """
from deltatune import hookimpl

@hookimpl
def deltatune_register_evaluators(register, unexpected_argument):
    pass
"""

NO_CONFIG = """
from deltatune import hookimpl

class NoConfig:
    name = "noconfig"
    def evaluate(self, model, tokenizer, rows, cfg):
        return {}

@hookimpl
def deltatune_register_evaluators(register):
    register(NoConfig)
"""

MISSING_METHOD = """
from pydantic import BaseModel, ConfigDict
from deltatune import hookimpl

class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

class NoEvaluate:
    name = "noevaluate"
    Config = Cfg

@hookimpl
def deltatune_register_evaluators(register):
    register(NoEvaluate)
"""

WRONG_OPTIONAL_MEMBER = """
from pydantic import BaseModel, ConfigDict
from deltatune import hookimpl

class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Sgd:
    name = "badstate"
    Config = Cfg
    state_bytes_per_param = 8.0  # declared on OptimizerFactory as a method of cfg

    def create(self, named_params, cfg, total_steps):
        raise NotImplementedError

@hookimpl
def deltatune_register_optimizers(register):
    register(Sgd)
"""

OPTIMIZERS = """
from pydantic import BaseModel, ConfigDict
from deltatune import hookimpl

class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Plain:
    name = "plain"
    Config = Cfg

    def create(self, named_params, cfg, total_steps):
        raise NotImplementedError

class Declaring(Plain):
    name = "declaring"
    updates_in_backward = True

    def state_bytes_per_param(self, cfg):
        return 2.5

@hookimpl
def deltatune_register_optimizers(register):
    register(Plain)
    register(Declaring)
"""


def fake_manager(strict: bool = False, **kwargs) -> PluginManager:
    manager = PluginManager(strict=strict)
    manager.load_entry_points(**kwargs)
    return manager


def test_good_plugin_is_found_with_its_distribution(fake_dist):
    fake_dist("deltatune-echo", "1.2.3", {"echo": GOOD.format(name="echo")})
    info = fake_manager().get("evaluator", "echo")
    assert (info.distribution, info.version) == ("deltatune-echo", "1.2.3")
    assert info.cls().evaluate(None, None, [1, 2], None) == {"rows": 2.0}


@pytest.mark.parametrize(
    "source, fragment",
    [
        (BROKEN_IMPORT, "import failed"),
        (BAD_HOOK_SIGNATURE, "hook contract broken"),
        (NO_CONFIG, "no pydantic `Config`"),
        (MISSING_METHOD, "lacks evaluate"),
        (WRONG_OPTIONAL_MEMBER, "`state_bytes_per_param` must be a method, got float"),
    ],
)
def test_broken_plugin_is_reported_and_skipped(fake_dist, source, fragment):
    fake_dist("deltatune-echo", "1.0", {"echo": GOOD.format(name="echo")})
    fake_dist("deltatune-broken", "0.9", {"broken": source})
    manager = fake_manager()
    assert manager.get("evaluator", "echo").distribution == "deltatune-echo"
    failures = [f for f in manager.failures if f.distribution == "deltatune-broken"]
    assert len(failures) == 1
    assert failures[0].version == "0.9"
    assert fragment in failures[0].error


def test_strict_mode_makes_a_broken_plugin_fatal(fake_dist):
    fake_dist("deltatune-broken", "0.9", {"broken": BROKEN_IMPORT})
    with pytest.raises(PluginError, match="deltatune-broken 0.9.*broken on purpose"):
        fake_manager(strict=True)


def test_two_distributions_registering_one_name_is_an_error_naming_both(fake_dist):
    fake_dist("deltatune-echo-a", "1.0", {"echoa": GOOD.format(name="echo")})
    fake_dist("deltatune-echo-b", "2.0", {"echob": GOOD.format(name="echo")})
    manager = fake_manager()
    with pytest.raises(ConfigError, match="deltatune-echo-a and deltatune-echo-b"):
        manager.get("evaluator", "echo")
    with pytest.raises(PluginError, match="deltatune-echo-a and deltatune-echo-b"):
        fake_manager(strict=True)


def test_allow_and_deny_lists_from_the_environment(fake_dist, monkeypatch):
    fake_dist("deltatune-echo", "1.0", {"echo": GOOD.format(name="echo"), "other": GOOD.format(name="other")})
    monkeypatch.setenv("DELTATUNE_PLUGINS", "echo")
    assert load_plugins().names("evaluator") == ["echo"]
    monkeypatch.delenv("DELTATUNE_PLUGINS")
    monkeypatch.setenv("DELTATUNE_DISABLE_PLUGINS", "echo,lora")
    manager = load_plugins()
    assert "echo" not in manager.names("evaluator") and "other" in manager.names("evaluator")
    assert "lora" not in manager.names("delta_method")


def test_unknown_name_lists_installed_names_and_the_registry_entry(monkeypatch):
    monkeypatch.setenv("DELTATUNE_DISABLE_PLUGINS", "lora")
    manager = load_plugins()
    with pytest.raises(ConfigError) as error:
        manager.get("delta_method", "lora")
    message = str(error.value)
    assert "unknown delta method 'lora'" in message
    assert "deltatune-lora (registry.toml)" in message and "pip install -e plugins/lora" in message
    with pytest.raises(ConfigError, match="Installed dataset builders: .*alpaca.*is listed in registry.toml either"):
        manager.get("dataset_builder", "no_such_builder")


def test_in_process_registration_for_tests():
    import types

    from deltatune import hookimpl

    module = types.ModuleType("inline_plugin")
    exec(GOOD.format(name="inline"), module.__dict__)
    module.deltatune_register_evaluators = hookimpl(module.deltatune_register_evaluators)
    manager = PluginManager()
    manager.register_module(module)
    assert manager.names("evaluator") == ["inline"]
    assert manager.get("evaluator", "inline").distribution == "<in-process>"


def test_optional_members_come_from_the_plugin_or_from_the_default_its_protocol_declares(fake_dist):
    fake_dist("deltatune-optimizers", "1.0", {"optimizers": OPTIMIZERS})
    manager = fake_manager()
    plain, declaring = (resolve("optimizer", name, manager) for name in ("plain", "declaring"))
    assert plain.optional("updates_in_backward") is False and plain.optional("state_bytes_per_param") is None
    assert declaring.optional("updates_in_backward") is True
    assert declaring.optional("state_bytes_per_param")(declaring.cfg) == 2.5
    with pytest.raises(KeyError, match="'fused' is not an optional member of OptimizerFactory"):
        plain.optional("fused")
    with pytest.raises(KeyError, match="not an optional member of Evaluator .declared: default"):
        optional_member("evaluator", plain.plugin, "updates_in_backward")


def test_optional_members_are_declared_apart_from_the_required_ones_with_defaults_of_their_shape():
    for kind in PLUGIN_KINDS.values():
        required = set(required_members(kind.protocol))
        for name, member in kind.optional.items():
            assert name not in required, f"{name} is both required and optional on {kind.protocol.__name__}"
            assert member.default is None or member.problem(member.default) is None, name
    assert set(PLUGIN_KINDS["quantizer"].optional) == {"bits_per_weight", "layers_to_quantize",
                                                       "transformers_quantization_config"}
    assert set(PLUGIN_KINDS["optimizer"].optional) == {"updates_in_backward", "honours_lr_multipliers",
                                                       "state_bytes_per_param", "default"}


def test_one_table_of_kinds_drives_the_manager_registry_scaffold_and_contract_kit():
    from typing import get_args

    from deltatune.cli.scaffold import KINDS as SCAFFOLD_KINDS
    from deltatune.plugin.registry import RegistryEntry
    from deltatune.testing import CONTRACTS

    kinds = tuple(PLUGIN_KINDS)
    assert kinds == ("dataset_builder", "delta_method", "quantizer", "evaluator", "optimizer", "model_family")
    assert get_args(RegistryEntry.model_fields["kind"].annotation) == kinds
    assert SCAFFOLD_KINDS == kinds
    assert {kind: contract.__name__ for kind, contract in CONTRACTS.items()} == {
        kind: spec.contract for kind, spec in PLUGIN_KINDS.items()}
