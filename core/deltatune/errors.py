"""Exceptions deltatune raises for bad input; each message says what is wrong and how to fix it."""


class DeltaTuneError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltaTuneError, ValueError):
    """A run configuration (plugin names, plugin options, their combination) is invalid."""


class PluginError(DeltaTuneError):
    """A plugin failed to load or broke its hook contract."""


class DataError(DeltaTuneError, ValueError):
    """A dataset file is missing or one of its rows is malformed (the message names file and line)."""


class ModelNotFoundError(DeltaTuneError, FileNotFoundError):
    """A base model could not be found locally (deltatune never downloads)."""


class DamagedFileError(DeltaTuneError, ValueError):
    """A file deltatune reads (model, adapter, manifest, data) is truncated or corrupt (the message names it)."""


def check_option(option: str, value: object, valid: bool, rule: str) -> None:
    """Raise :class:`ConfigError` ``"<option> <rule> (got <value>)"`` unless ``valid``."""
    if not valid:
        raise ConfigError(f"{option} {rule} (got {value!r})")


class OutputError(DeltaTuneError):
    """An output path cannot be written safely (it holds something deltatune did not write, or the run
    needs it), or writing it failed (disk full, permissions); the message names the path."""
