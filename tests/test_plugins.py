"""Plugin loading: entry points one by one, broken plugins reported and skipped, allow/deny lists."""

from __future__ import annotations

import pytest

from deltatune import ConfigError, PluginError
from deltatune.plugin.manager import PluginManager, load_plugins

GOOD = """
from typing import ClassVar
from pydantic import BaseModel, ConfigDict
from deltatune import hookimpl

class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Echo:
    name: ClassVar[str] = "{name}"
    Config = Cfg
    def evaluate(self, model, tokenizer, rows, cfg):
        return {{"rows": float(len(rows))}}

@hookimpl
def deltatune_register_evaluators(register):
    register(Echo)
"""

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
