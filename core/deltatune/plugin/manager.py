"""The plugin manager: loads entry points one by one, survives broken plugins, looks names up.

Entry points of the group ``deltatune`` are loaded individually. A plugin that fails to import,
whose hook implementations do not match the specifications, or that registers a class breaking its
protocol is recorded in :attr:`PluginManager.failures` (distribution, version, error) and skipped,
unless ``strict`` (``--strict-plugins``) makes it fatal. ``DELTATUNE_PLUGINS`` (comma-separated
entry-point names) is an allow list and ``DELTATUNE_DISABLE_PLUGINS`` a deny list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel

from deltatune.plugin import hookspecs
from deltatune.errors import ConfigError, PluginError
from deltatune.plugin.protocols import PLUGIN_KINDS, optional_member_problems, required_members
from deltatune.plugin.registry import load_registry


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin class and where it came from."""

    kind: str
    name: str
    cls: type
    distribution: str
    version: str
    source: str


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why."""

    distribution: str
    version: str
    source: str
    error: str


def _check_contract(kind: str, cls: Any) -> None:
    """Raise :class:`PluginError` when ``cls`` does not follow the protocol of ``kind``."""
    if not isinstance(cls, type):
        raise PluginError(f"registered {cls!r}, which is not a class")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{cls.__qualname__} has no `name: ClassVar[str]`")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise PluginError(f"{cls.__qualname__} ({name}) has no pydantic `Config` class")
    if config.model_config.get("extra") != "forbid":
        raise PluginError(f"{cls.__qualname__}.Config ({name}) must set extra='forbid'")
    protocol = PLUGIN_KINDS[kind].protocol
    missing = [m for m in required_members(protocol) if not hasattr(cls, m)]
    if missing:
        raise PluginError(f"{cls.__qualname__} ({name}) lacks {', '.join(missing)} of {protocol.__name__}")
    wrong = optional_member_problems(kind, cls)
    if wrong:
        raise PluginError(f"{cls.__qualname__} ({name}): {'; '.join(wrong)} (optional members of {protocol.__name__})")


class PluginManager:
    """Holds every registered plugin class by kind and name."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.pluggy = pluggy.PluginManager("deltatune")
        self.pluggy.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.conflicts: dict[tuple[str, str], list[PluginInfo]] = {}
        self._plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in PLUGIN_KINDS}

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self, allow: set[str] | None = None, deny: set[str] | None = None) -> None:
        """Load every entry point of the group ``deltatune`` not filtered out."""
        for ep in sorted(entry_points(group="deltatune"), key=lambda e: e.name):
            if (allow is not None and ep.name not in allow) or (deny and ep.name in deny):
                continue
            self._load_entry_point(ep)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = ep.dist.name if ep.dist else "<unknown>"
        version = ep.dist.version if ep.dist else ""
        try:
            module = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin (even one calling sys.exit) must not take the others down
            self._fail(dist, version, f"{ep.name} = {ep.value}", f"import failed: {exc!r}", exc)
            return
        self.register_module(module, distribution=dist, version=version, source=f"{ep.name} = {ep.value}")

    def register_module(
        self, module: ModuleType | object, distribution: str = "<in-process>", version: str = "", source: str = ""
    ) -> None:
        """Register one plugin module (or object with hook implementations) and collect its classes."""
        source = source or getattr(module, "__name__", repr(module))
        try:
            self.pluggy.register(module, name=source)
        except Exception as exc:
            self._fail(distribution, version, source, f"hook contract broken: {exc}", exc)
            return
        collected: list[PluginInfo] = []
        try:
            for kind, spec in PLUGIN_KINDS.items():
                for impl in getattr(self.pluggy.hook, spec.hook).get_hookimpls():
                    if impl.plugin is not module:
                        continue

                    def register(cls: type, _kind: str = kind) -> None:
                        _check_contract(_kind, cls)
                        collected.append(PluginInfo(_kind, cls.name, cls, distribution, version, source))

                    impl.function(register=register)
        except Exception as exc:
            self.pluggy.unregister(module)
            self._fail(distribution, version, source, f"registration failed: {exc}", exc)
            return
        for info in collected:
            self._add(info)

    def _add(self, info: PluginInfo) -> None:
        existing = self._plugins[info.kind].get(info.name)
        if existing is not None and existing.distribution != info.distribution:
            self.conflicts.setdefault((info.kind, info.name), [existing]).append(info)
            message = (
                f"{PLUGIN_KINDS[info.kind].label} '{info.name}' is registered by two distributions: "
                f"{existing.distribution} and {info.distribution}; uninstall one or deny it with "
                "DELTATUNE_DISABLE_PLUGINS"
            )
            if self.strict:
                raise PluginError(message)
            return
        self._plugins[info.kind][info.name] = info

    def _fail(self, distribution: str, version: str, source: str, error: str, exc: BaseException) -> None:
        failure = PluginFailure(distribution, version, source, error)
        if self.strict:
            raise PluginError(f"plugin {distribution} {version} ({source}): {error}") from exc
        self.failures.append(failure)

    # -- lookup ----------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Installed names of ``kind``, sorted."""
        return sorted(self._plugins[kind])

    def all(self) -> list[PluginInfo]:
        """Every registered plugin class, by kind then name."""
        return [info for kind in PLUGIN_KINDS for _, info in sorted(self._plugins[kind].items())]

    def get(self, kind: str, name: str) -> PluginInfo:
        """The plugin ``name`` of ``kind``; a :class:`ConfigError` explaining what is installed if not."""
        if (kind, name) in self.conflicts:
            both = " and ".join(i.distribution for i in self.conflicts[(kind, name)])
            raise ConfigError(f"{PLUGIN_KINDS[kind].label} '{name}' is registered by {both}; keep only one")
        info = self._plugins[kind].get(name)
        if info is not None:
            return info
        installed = ", ".join(self.names(kind)) or "none"
        message = f"unknown {PLUGIN_KINDS[kind].label} '{name}'. Installed {PLUGIN_KINDS[kind].label}s: {installed}."
        entry = load_registry().find(kind, name)
        if entry is not None:
            message += (
                f" '{name}' is provided by {entry.distribution} (registry.toml): install it with "
                f"`{entry.install_command()}`."
            )
        else:
            message += f" No plugin named '{name}' is listed in registry.toml either."
        raise ConfigError(message)


def _env_set(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def load_plugins(strict: bool | None = None) -> PluginManager:
    """A new manager loaded from entry points, honouring ``DELTATUNE_PLUGINS`` (allow list),
    ``DELTATUNE_DISABLE_PLUGINS`` (deny list) and ``DELTATUNE_STRICT_PLUGINS=1``."""
    if strict is None:
        strict = os.environ.get("DELTATUNE_STRICT_PLUGINS", "") not in ("", "0")
    manager = PluginManager(strict=strict)
    manager.load_entry_points(allow=_env_set("DELTATUNE_PLUGINS"), deny=_env_set("DELTATUNE_DISABLE_PLUGINS") or set())
    return manager


@lru_cache(maxsize=1)
def _default_manager() -> PluginManager:
    return load_plugins()


def get_plugin_manager() -> PluginManager:
    """The process-wide manager (loaded once). Tests build their own with :class:`PluginManager`."""
    return _default_manager()



def reset_plugin_manager() -> None:
    """Forget the process-wide manager so the next call reloads entry points (tests that install plugins)."""
    _default_manager.cache_clear()
