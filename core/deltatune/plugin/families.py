"""The installed model-family plugins and the one claiming a model's ``config.model_type``.

It sits below the model layer so that both :mod:`deltatune.model.families` (which family serves a model
exactly) and target selection (:func:`deltatune.deltas.targets.target_roles`, which asks the family how
its linear layers divide into roles) find the family the same way.
"""

from __future__ import annotations

from typing import Any

from deltatune.errors import ConfigError
from deltatune.plugin.manager import PluginManager, get_plugin_manager

KIND = "model_family"


def installed_families(manager: PluginManager | None = None) -> list[Any]:
    """An instance of every model family ``manager`` (default: the installed plugins) holds, by name."""
    manager = manager or get_plugin_manager()
    return [manager.get(KIND, name).cls() for name in manager.names(KIND)]


def claiming_family(config: Any, families: list[Any]) -> Any | None:
    """The family of ``families`` whose ``model_types`` hold ``config.model_type``, or ``None``.

    Raises :class:`ConfigError` when two families claim the model type (naming both)."""
    model_type = getattr(config, "model_type", None)
    claiming = [family for family in families if model_type in family.model_types]
    if len(claiming) > 1:
        raise ConfigError(f"model families {' and '.join(f.name for f in claiming)} both serve model type "
                          f"'{model_type}'; uninstall one")
    return claiming[0] if claiming else None
