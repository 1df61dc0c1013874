"""What every plugin must do, whatever its kind: :class:`PluginContract`, the base of the contracts."""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import pytest

from deltatune.errors import ConfigError
from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.protocols import PLUGIN_KINDS, optional_member_problems
from deltatune.plugin.resolve import resolve
from deltatune.testing.helpers import isolated_manager, tiny_base_folder

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
            self.base = tiny_base_folder(tmp_path_factory, self.tiny_overrides)
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
