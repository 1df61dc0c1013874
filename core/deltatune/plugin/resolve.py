"""Run-level configuration models: plugin references and their validation."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from deltatune.errors import ConfigError
from deltatune.plugin.manager import PluginInfo, PluginManager, get_plugin_manager
from deltatune.plugin.protocols import PLUGIN_KINDS, optional_member


class PluginRef(BaseModel):
    """A plugin by name plus its options: ``{name: lora, config: {r: 16}}`` or just ``lora``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    config: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value


@dataclass(frozen=True)
class ResolvedPlugin:
    """A plugin reference bound to its class, instance and validated options."""

    ref: PluginRef
    info: PluginInfo
    plugin: Any
    cfg: BaseModel

    @property
    def name(self) -> str:
        """The plugin's registered name."""
        return self.info.name

    def optional(self, member: str) -> Any:
        """The plugin's optional member ``member`` (a bound method or a value), or the default its
        protocol declares for it (:func:`deltatune.plugin.protocols.optional_member`)."""
        return optional_member(self.info.kind, self.plugin, member)


def format_validation_error(kind: str, name: str, error: ValidationError, fields: list[str] | None = None) -> str:
    """One line naming the plugin and every invalid field; an unknown option lists the valid ``fields``
    and suggests the closest one (``rank`` → ``did you mean 'r'?``)."""
    problems = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(options)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown option{_suggestion(field, fields or [])}")
        else:
            problems.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    valid = f" (valid options: {', '.join(fields)})" if fields and any(
        item["type"] == "extra_forbidden" for item in error.errors()) else ""
    return f"invalid options for {PLUGIN_KINDS[kind].label} '{name}': {'; '.join(problems)}{valid}"


def _suggestion(field: str, fields: list[str]) -> str:
    """`` — did you mean 'r'?`` for the valid field closest to ``field`` (by spelling, or a field it abbreviates
    or extends), or nothing."""
    leaf = field.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, fields, n=1, cutoff=0.6)
    if not close:  # `rank` → `r`, `learning_rate` → `lr`: a field the unknown name begins with, or its initials
        initials = "".join(part[0] for part in leaf.split("_") if part)
        close = [f for f in fields if f in (initials, leaf[: len(f)]) and len(f) < len(leaf)][:1]
    return f", did you mean '{close[0]}'?" if close else ""


def coerce_ref(value: PluginRef | str | dict[str, Any]) -> PluginRef:
    """Accept the short and the long forms of a plugin reference."""
    return value if isinstance(value, PluginRef) else PluginRef.model_validate(value)


def default_name(kind: str, manager: PluginManager | None = None) -> str:
    """The plugin of ``kind`` a run uses when it names none: the one installed plugin whose class
    declares ``default = True`` (an optional member of every protocol that has one)."""
    manager = manager or get_plugin_manager()
    # declared by the class itself: a subclass of the default plugin is not a second default
    names = [n for n in manager.names(kind) if vars(manager.get(kind, n).cls).get("default") is True]
    if len(names) != 1:
        label = PLUGIN_KINDS[kind].label
        why = f"no installed {label} declares itself the default" if not names else (
            f"{' and '.join(names)} all declare themselves the default {label}")
        raise ConfigError(f"{why}; name the {label} in the run configuration")
    return names[0]


def resolve(kind: str, ref: PluginRef | str | dict[str, Any], manager: PluginManager | None = None) -> ResolvedPlugin:
    """Look ``ref`` up among installed plugins of ``kind`` and validate its options.

    Raises :class:`ConfigError` for an unknown name (listing installed names and the registry entry
    that provides it) or invalid options (naming the plugin, the field and the allowed values).
    """
    ref = coerce_ref(ref)
    manager = manager or get_plugin_manager()
    info = manager.get(kind, ref.name)
    try:
        cfg = info.cls.Config.model_validate(ref.config)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(kind, ref.name, exc, list(info.cls.Config.model_fields))) from None
    return ResolvedPlugin(ref=ref, info=info, plugin=info.cls(), cfg=cfg)
