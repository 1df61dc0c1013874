"""deltatune: plugin-based delta (parameter-efficient) fine-tuning of LLMs on Lightning.

Importing ``deltatune`` is light (no torch, transformers or Lightning): it holds only
``__version__`` and ``hookimpl``. Plugins import what they use from :mod:`deltatune.api`, the
declared plugin API; every other module is internal.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

hookimpl = pluggy.HookimplMarker("deltatune")
"""Decorator marking a plugin's hook implementations."""

try:
    __version__ = version("deltatune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "hookimpl"]
