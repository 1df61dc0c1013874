"""deltatune: plugin-based delta (parameter-efficient) fine-tuning of LLMs on Lightning.

The public API for plugin authors is what this module exports; everything else is internal.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

hookimpl = pluggy.HookimplMarker("deltatune")
"""Decorator marking a plugin's hook implementations."""

try:
    __version__ = version("deltatune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from deltatune.plugin.resolve import PluginRef, resolve  # noqa: E402
from deltatune.errors import ConfigError, DataError, DeltaTuneError, ModelNotFoundError, PluginError  # noqa: E402
from deltatune.deltas.layers import Delta, DeltaLinear, LayerDeltaMethod, base_weight  # noqa: E402
from deltatune.plugin.protocols import DatasetBuilder, DeltaMethod, Evaluator, OptimizerFactory, Quantizer, Row  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "DatasetBuilder",
    "Delta",
    "DeltaLinear",
    "DeltaMethod",
    "DeltaTuneError",
    "Evaluator",
    "LayerDeltaMethod",
    "ModelNotFoundError",
    "OptimizerFactory",
    "PluginError",
    "PluginRef",
    "Quantizer",
    "Row",
    "__version__",
    "base_weight",
    "hookimpl",
    "resolve",
]
