"""``deltatune new-plugin NAME --kind KIND``: scaffold a plugin package.

The package it writes is complete and installable from the first minute::

    deltatune-NAME/
        pyproject.toml             # [project.entry-points.deltatune] NAME = "deltatune_NAME"
        README.md
        deltatune_NAME/__init__.py # the plugin class, its Config and the hook, with TODOs
        tests/test_contract.py     # deltatune.testing's contract for KIND, on the in-process module

Its contract tests run at once (``cd deltatune-NAME && pytest``; the package need not be installed,
the tests register the module in-process) and fail — ``NotImplementedError`` naming what to write —
until the plugin is implemented. ``pip install -e deltatune-NAME`` then makes the plugin appear in
``deltatune plugins``.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path

from deltatune import __version__
from deltatune.errors import ConfigError
from deltatune.plugin.protocols import PLUGIN_KINDS

KINDS = tuple(PLUGIN_KINDS)
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _core_requirement() -> str:
    major, minor = (__version__.split(".") + ["0"])[:2]
    return f"deltatune>={major}.{minor},<{major}.{int(minor) + 1}" if major.isdigit() and minor.isdigit() else "deltatune"


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "deltatune-{name}"
version = "0.1.0"
description = "{summary}"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["{core}", "torch>=2.4", "pydantic>=2.7"]

[project.optional-dependencies]
test = ["pytest>=8"]

# this entry point is what makes the package a deltatune plugin
[project.entry-points.deltatune]
{name} = "deltatune_{name}"

[tool.setuptools.packages.find]
include = ["deltatune_{name}*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]
addopts = "-p no:cacheprovider --import-mode=importlib"
'''

README = '''\
# deltatune-{name}

A deltatune {label} plugin: `{name}`.

```bash
pytest                      # the deltatune contract for a {label}: fails until the TODOs are done
pip install -e .            # then `deltatune plugins` lists `{name}`
```

Write the plugin in `deltatune_{name}/__init__.py` (every `TODO`), run the tests, and see
`docs/plugin-authoring.md` in the deltatune repository for the manual.
'''

HEADER = '''\
"""{label_cap} `{name}`: TODO say in a paragraph what it does and cite where it comes from.

Scaffolded by `deltatune new-plugin {name} --kind {kind}`. The contract tests in `tests/` say what is
still missing; `docs/plugin-authoring.md` in the deltatune repository is the manual.
"""

from __future__ import annotations

'''

MODULES = {
    "delta_method": '''\
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import Delta, DeltaLinear, LayerDeltaMethod, hookimpl


class {cls}Config(BaseModel):
    """Options of the ``{name}`` delta method."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module-name suffixes, 're:REGEX', or 'all-linear' (every linear layer but the LM head)",
    )


class {cls}Delta(Delta):
    """The trainable tensors of one wrapped linear layer."""

    additive: ClassVar[bool] = True  # False when forward does more than add to `result`

    def __init__(self, in_features: int, out_features: int, cfg: {cls}Config) -> None:
        super().__init__()
        # TODO: create the trainable nn.Parameter(s), initialised so the model is unchanged at first
        raise NotImplementedError("{name}: create the trainable parameters in {cls}Delta.__init__")

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """The layer output after this delta, given the input ``x`` and the output so far."""
        raise NotImplementedError("{name}: write {cls}Delta.forward")

    def merge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """The dense weight (fp32, out x in) with this delta folded in."""
        raise NotImplementedError("{name}: write {cls}Delta.merge_weight")

    def unmerge_weight(self, weight: torch.Tensor, layer: DeltaLinear) -> torch.Tensor:
        """The inverse of ``merge_weight``."""
        raise NotImplementedError("{name}: write {cls}Delta.unmerge_weight")


class {cls}(LayerDeltaMethod):
    """The ``{name}`` delta method: a ``{cls}Delta`` on every targeted linear layer."""

    name: ClassVar[str] = "{name}"
    Config: ClassVar[type[BaseModel]] = {cls}Config
    supports_quantized: ClassVar[bool] = True  # False if it must read a dense base weight it cannot dequantize

    def make_delta(self, layer: DeltaLinear, cfg: {cls}Config, layer_name: str) -> {cls}Delta:
        """The delta for one wrapped layer."""
        return {cls}Delta(layer.in_features, layer.out_features, cfg)

    def peft_config(self, cfg: {cls}Config) -> dict[str, Any] | None:
        """PEFT's adapter_config.json equivalent, or None when PEFT cannot express the method."""
        return None


@hookimpl
def deltatune_register_delta_methods(register) -> None:
    """Provide ``{name}``."""
    register({cls})
''',
    "dataset_builder": '''\
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from deltatune.api import DataError, Row, encode_example, hookimpl, read_records


class {cls}Config(BaseModel):
    """Options of the ``{name}`` dataset builder."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="training file")
    validation_path: str | None = None
    test_path: str | None = None
    max_length: int = Field(512, gt=8)


class {cls}Builder:
    """The ``{name}`` dataset builder."""

    name: ClassVar[str] = "{name}"
    Config: ClassVar[type[BaseModel]] = {cls}Config

    def build(self, cfg: {cls}Config, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split``, or None when the configuration gives no file for it."""
        path = {{"train": cfg.path, "validation": cfg.validation_path, "test": cfg.test_path}}[split]
        if path is None:
            return None
        # TODO: for each record of read_records(Path(path)): check its fields (raise DataError naming
        # the file and the line), then encode_example(tokenizer, prompt, response, cfg.max_length)
        raise NotImplementedError("{name}: write {cls}Builder.build")


@hookimpl
def deltatune_register_dataset_builders(register) -> None:
    """Provide ``{name}``."""
    register({cls}Builder)
''',
    "evaluator": '''\
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import Row, hookimpl


class {cls}Config(BaseModel):
    """Options of the ``{name}`` evaluator."""

    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(None, gt=0, description="evaluate at most this many rows")


class {cls}:
    """The ``{name}`` evaluator."""

    name: ClassVar[str] = "{name}"
    Config: ClassVar[type[BaseModel]] = {cls}Config

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: {cls}Config) -> dict[str, float]:
        """Flat float metrics of ``model`` on ``rows`` (called in eval mode under torch.no_grad)."""
        rows = rows[: cfg.limit] if cfg.limit else rows
        # TODO: compute the metrics
        raise NotImplementedError("{name}: write {cls}.evaluate")


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``{name}``."""
    register({cls})
''',
    "quantizer": '''\
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import hookimpl


class {cls}Config(BaseModel):
    """Options of the ``{name}`` quantizer."""

    model_config = ConfigDict(extra="forbid")

    skip: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name suffixes left dense")


class {cls}:
    """The ``{name}`` quantizer."""

    name: ClassVar[str] = "{name}"
    Config: ClassVar[type[BaseModel]] = {cls}Config

    def quantize(self, model: nn.Module, cfg: {cls}Config) -> None:
        """Replace the targeted nn.Linear layers of ``model`` by quantized ones, in place."""
        raise NotImplementedError("{name}: write {cls}.quantize")

    def is_quantized(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer this quantizer produced."""
        return False  # TODO

    def dequantize_weight(self, module: nn.Module) -> torch.Tensor:
        """The dense (out x in) weight ``module`` computes with."""
        raise NotImplementedError("{name}: write {cls}.dequantize_weight")


@hookimpl
def deltatune_register_quantizers(register) -> None:
    """Provide ``{name}``."""
    register({cls})
''',
    "optimizer": '''\
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from deltatune.api import hookimpl


class {cls}Config(BaseModel):
    """Options of the ``{name}`` optimizer."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)


class {cls}:
    """The ``{name}`` optimizer factory."""

    name: ClassVar[str] = "{name}"
    Config: ClassVar[type[BaseModel]] = {cls}Config

    def create(
        self, named_params: list[tuple[str, nn.Parameter]], cfg: {cls}Config, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer over ``named_params`` and a per-step scheduler (or None)."""
        raise NotImplementedError("{name}: write {cls}.create")


@hookimpl
def deltatune_register_optimizers(register) -> None:
    """Provide ``{name}``."""
    register({cls})
''',
}

TESTS = {
    "delta_method": '''\
class Test{cls}Contract(DeltaMethodContract):
    method_name = "{name}"
    plugin_module = "deltatune_{name}"  # registered in-process: no install needed to run these tests
    config = {{"targets": ["q_proj", "v_proj"]}}
    promises_identity_at_init = True  # TODO: False if a fresh {name} changes the outputs
    supports_nf4 = True  # TODO: False (and supports_quantized = False) if it needs a dense base
''',
    "dataset_builder": '''\
class Test{cls}Contract(DatasetBuilderContract):
    builder_name = "{name}"
    plugin_module = "deltatune_{name}"  # registered in-process: no install needed to run these tests
    # TODO: examples in your format, written one per line by `write` (override it for other formats)
    records = [
        {{"prompt": "Reverse the order of these words: red fox jumps", "response": "jumps fox red"}},
        {{"prompt": "What is 17 plus 25?", "response": "42"}},
    ]
    malformed = [{{"prompt": "a record without a response"}}, "this line is not JSON"]
''',
    "evaluator": '''\
class Test{cls}Contract(EvaluatorContract):
    evaluator_name = "{name}"
    plugin_module = "deltatune_{name}"  # registered in-process: no install needed to run these tests
    expected_metrics: set[str] = set()  # TODO: the metric names it always reports
''',
    "quantizer": '''\
class Test{cls}Contract(QuantizerContract):
    quantizer_name = "{name}"
    plugin_module = "deltatune_{name}"  # registered in-process: no install needed to run these tests
    max_weight_error = 0.15  # TODO: the relative weight error your format promises
''',
    "optimizer": '''\
class Test{cls}Contract(OptimizerContract):
    optimizer_name = "{name}"
    plugin_module = "deltatune_{name}"  # registered in-process: no install needed to run these tests
    config = {{"lr": 0.05}}
''',
}


def scaffold(name: str, kind: str, parent: Path | str = ".") -> Path:
    """Write the package ``deltatune-NAME`` for a plugin of ``kind`` under ``parent``; return its folder.

    Raises :class:`ConfigError` for an invalid name or kind, or when the folder exists and is not empty.
    """
    if not NAME.match(name):
        raise ConfigError(f"plugin name '{name}' must be lower case letters, digits and '_', starting with a letter")
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind '{kind}'; choose one of {', '.join(KINDS)}")
    folder = Path(parent) / f"deltatune-{name}"
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} already exists and is not empty; choose another name or folder")
    label = PLUGIN_KINDS[kind].label
    fields = {"name": name, "cls": _class_name(name), "kind": kind, "label": label,
              "label_cap": label.capitalize(), "core": _core_requirement(),
              "summary": f"A deltatune {label}: {name}"}
    package = folder / f"deltatune_{name}"
    (folder / "tests").mkdir(parents=True, exist_ok=True)
    package.mkdir(exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(**fields))
    (folder / "README.md").write_text(README.format(**fields))
    (package / "__init__.py").write_text(HEADER.format(**fields) + MODULES[kind].format(**fields))
    contract = PLUGIN_KINDS[kind].contract
    tests = textwrap.dedent(f'''\
        """The deltatune contract for `{name}` ({label}): what every {label} must pass.

        These tests come with deltatune (`deltatune.testing`, a pytest plugin). Add tests of what
        is specific to `{name}` in other files of this folder.
        """

        from deltatune.testing import {contract}


        ''') + TESTS[kind].format(**fields)
    (folder / "tests" / "test_contract.py").write_text(tests)
    return folder


def cmd_new_plugin(args: argparse.Namespace) -> None:
    """``deltatune new-plugin``: write the package and say what to do next."""
    from deltatune.ui.console import console

    folder = scaffold(args.name, args.kind, args.dir)
    console.print(f"wrote {folder}/ (a {PLUGIN_KINDS[args.kind].label} plugin '{args.name}')", highlight=False)
    console.print(f"next: cd {folder} && pytest   # contract tests fail until the TODOs in "
                  f"deltatune_{args.name}/__init__.py are done; then pip install -e {folder}", highlight=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``new-plugin`` to the ``deltatune`` command's subparsers."""
    parser = sub.add_parser("new-plugin", help="scaffold a plugin package (pyproject, module, contract tests)")
    parser.add_argument("name", help="the plugin's registered name (lower case, e.g. ia3)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--dir", default=".", help="where to create deltatune-NAME/ (default: here)")
    parser.set_defaults(func=cmd_new_plugin)
