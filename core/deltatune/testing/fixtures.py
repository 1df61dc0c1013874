"""The pytest fixtures (and markers) deltatune registers for every test suite (``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.testing.helpers import isolated_manager


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers deltatune's test suites use."""
    config.addinivalue_line(
        "markers", "measured: measures this machine (peak memory of real runs in fresh processes); slower")


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
