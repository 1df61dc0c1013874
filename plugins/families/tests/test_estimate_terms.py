"""The Llama family's estimate terms (``activation_terms``): ``deltatune estimate`` asks the family
whose fast forward runs the model, and a family without them gets the plain forward's terms."""

from __future__ import annotations

import types

import pytest

from deltatune.api import hookimpl, plain_activation_bytes
from deltatune.estimate.activations import activation_bytes
from deltatune.estimate.counting import layout, load_config
from deltatune.model.assembly import resolve_spec
from deltatune.plugin import families
from deltatune.testing import isolated_manager
from deltatune_families import Family, Llama
from deltatune_families.estimate import LlamaActivations

LORA = [{"name": "lora", "config": {"r": 8, "targets": "all-linear"}}]


class LlamaWithoutTerms(Family):
    """A Llama family with the fast forward but without estimate terms."""

    name = "llama_without_terms"
    model_types = ("llama",)
    fast_forward = Llama.fast_forward


def _only(family: type) -> types.ModuleType:
    """A plugin module registering ``family``."""
    module = types.ModuleType(f"deltatune_test_{family.__name__.lower()}")
    module.deltatune_register_model_families = hookimpl(lambda register: register(family))
    return module


def test_the_estimate_takes_the_terms_of_the_family_whose_fast_forward_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    config, deltas = load_config("tiny-llama"), resolve_spec({"base": "tiny-llama", "delta": LORA}).deltas
    fast = layout(config, deltas, None)
    assert isinstance(fast.fast_terms, LlamaActivations) and fast.compute_copies > 0
    assert layout(config, deltas, None, fast_path=False).fast_terms is None
    plain = plain_activation_bytes(config, fast, 2, 64, 2)
    assert activation_bytes(config, fast, 2, 64, 2) != plain

    manager = isolated_manager(_only(LlamaWithoutTerms), entry_points_too=False)
    monkeypatch.setattr(families, "get_plugin_manager", lambda: manager)
    without = layout(config, deltas, None)
    assert without.fast_terms is None and without.compute_copies == 0
    assert activation_bytes(config, without, 2, 64, 2) == plain_activation_bytes(config, without, 2, 64, 2)
