"""deltatune's pytest plugin: fixtures and contract tests for plugin authors.

The core registers this module with pytest through the ``pytest11`` entry point, so in any
environment where ``deltatune`` is installed, pytest knows these fixtures:

``tiny_model``
    a fresh random 2-layer Llama (:func:`deltatune.model.loading.tiny_llama`, fp32, seed 0, eval mode);
``tiny_tokenizer``
    the byte-level tokenizer that goes with it (ChatML template included);
``plugin_manager``
    an isolated :class:`deltatune.plugin.manager.PluginManager` loaded from the installed entry points (not
    the process-wide one): call ``plugin_manager.register_module(module)`` to add a plugin module
    in-process, without installing it;
``make_plugin_manager``
    a factory, ``make_plugin_manager(module, ..., entry_points_too=True)``, for a manager holding the
    given in-process modules (their own installed entry points, if any, are left out so nothing is
    registered twice).

and gives every plugin kind a *contract*: a class of tests that every plugin of that kind must pass.
A plugin's test suite subclasses it, says which plugin to test, and inherits the tests::

    from deltatune.testing import DeltaMethodContract

    class TestIA3Contract(DeltaMethodContract):
        method_name = "ia3"
        config = {"targets": ["k_proj", "v_proj", "down_proj"]}
        promises_identity_at_init = True      # a fresh IA3 leaves the model's outputs unchanged
        quantizer = {"name": "nf4"}           # checked on a 4-bit base
        compose_with = {"name": "lora", "config": {"targets": ["q_proj", "o_proj"]}}

The contracts are :class:`DeltaMethodContract`, :class:`DatasetBuilderContract`,
:class:`EvaluatorContract`, :class:`QuantizerContract`, :class:`OptimizerContract` and
:class:`ModelFamilyContract`
(:data:`CONTRACTS` maps each plugin kind to its contract), one module each
(:mod:`~deltatune.testing.delta_methods`, …, built on :mod:`~deltatune.testing.contract` and
:mod:`~deltatune.testing.helpers`; the fixtures live in :mod:`~deltatune.testing.fixtures`). Each
runs the plugin through the real core
(:func:`deltatune.model.assembly.resolve_spec` / :func:`~deltatune.model.assembly.build_model`,
:func:`deltatune.io.adapter.save_adapter` / :func:`~deltatune.io.adapter.load_adapter`) on the tiny model,
with a manager that holds the installed plugins — or, when the subclass sets ``plugin_module``
(a module or its import name), that module registered in-process. Every test of a contract checks
something; the flags (``promises_identity_at_init``, ``trains_base_weights``, …) choose *what* is
checked, never whether: a method that does not support a quantized base is checked to refuse it with
a clear error, for example. The other plugins a check needs — the quantizer a delta method sits on,
the delta method an evaluator or a quantizer is combined with — are parameters of the subclass
(``quantizer``, ``compose_with``, ``wrapped_with``, ``delta``): the kit requires no particular plugin.
Without a partner a check falls back to what the core alone provides (listing the method twice is
refused; linear layers wrapped with no delta) or, where there is nothing to fall back to (a quantized
base, a method on top of a quantizer), is skipped with a reason. ``docs/plugin-authoring.md`` is the
manual. :mod:`~deltatune.testing.chat_templates` holds the published chat templates of real models
(SmolLM2, Llama 3, Qwen 2.5/3, Gemma 2, Mistral, Phi-3.5) in tiny byte-level tokenizers, for tests of
anything that renders chat prompts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from deltatune.plugin.protocols import PLUGIN_KINDS
from deltatune.testing.contract import PluginContract
from deltatune.testing.dataset_builders import DatasetBuilderContract
from deltatune.testing.delta_methods import DeltaMethodContract
from deltatune.testing.evaluators import EvaluatorContract
from deltatune.testing.fixtures import (  # noqa: F401 (pytest finds fixtures and hooks in this module)
    make_plugin_manager,
    plugin_manager,
    pytest_configure,
    tiny_model,
    tiny_tokenizer,
)
from deltatune.testing.model_families import ModelFamilyContract
from deltatune.testing.helpers import (
    adam_losses,
    fast_forward_runs,
    isolated_manager,
    logits_of,
    max_parameter_difference,
    max_relative_difference,
    sample_batch,
    sample_rows,
    token_batches,
    text_started,
    trained_like,
)
from deltatune.testing.optimizers import OptimizerContract
from deltatune.testing.quantizers import QuantizerContract

__all__ = [
    "CONTRACTS",
    "DatasetBuilderContract",
    "DeltaMethodContract",
    "EvaluatorContract",
    "ModelFamilyContract",
    "OptimizerContract",
    "PluginContract",
    "QuantizerContract",
    "adam_losses",
    "fast_forward_runs",
    "isolated_manager",
    "logits_of",
    "max_parameter_difference",
    "max_relative_difference",
    "token_batches",
    "text_started",
    "trained_like",
    "sample_batch",
    "sample_rows",
]

CONTRACTS: dict[str, type[PluginContract]] = {kind: globals()[spec.contract] for kind, spec in PLUGIN_KINDS.items()}
"""Plugin kind → its contract class (named in :data:`deltatune.plugin.protocols.PLUGIN_KINDS`)."""


def contract_subclasses(paths: list[Path]) -> Iterator[tuple[Path, str, str]]:
    """``(file, class name, contract name)`` for every class in the ``*.py`` files under ``paths``
    that subclasses a contract (by source text; used by the meta-tests)."""
    pattern = re.compile(r"^class\s+(\w+)\((\w+Contract)\)", re.MULTILINE)
    for root in paths:
        for file in sorted(Path(root).rglob("test_*.py")):
            for name, base in pattern.findall(file.read_text(encoding="utf-8")):
                yield file, name, base
