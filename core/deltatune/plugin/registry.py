"""``registry.toml``: the catalogue of known plugins (first-party and vetted third-party)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from packaging.specifiers import SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltatune.plugin.protocols import PLUGIN_KINDS

Kind = Literal[tuple(PLUGIN_KINDS)]  # type: ignore[valid-type]  # the kind names of the one table


class RegistryEntry(BaseModel):
    """One plugin the project knows about."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Kind
    distribution: str
    path: str | None = None
    summary: str
    core: str = Field(description="PEP 440 specifier of the core versions the plugin supports")

    @field_validator("core")
    @classmethod
    def _valid_specifier(cls, value: str) -> str:
        SpecifierSet(value)
        return value

    def install_command(self) -> str:
        """The command that installs this plugin (from its folder when it ships in this repo)."""
        return f"pip install -e {self.path}" if self.path else f"pip install {self.distribution}"

    def supports(self, core_version: str) -> bool:
        """Whether this plugin declares support for ``core_version``."""
        return SpecifierSet(self.core).contains(core_version, prereleases=True)


class Registry(BaseModel):
    """The whole catalogue: a list of ``[[plugin]]`` tables."""

    model_config = ConfigDict(extra="forbid")

    plugin: list[RegistryEntry] = []

    def find(self, kind: str, name: str) -> RegistryEntry | None:
        """The entry for ``name`` of ``kind``, if catalogued."""
        return next((e for e in self.plugin if e.kind == kind and e.name == name), None)


def registry_path() -> Path | None:
    """Where ``registry.toml`` is: ``$DELTATUNE_REGISTRY``, else the source checkout of the core."""
    if env := os.environ.get("DELTATUNE_REGISTRY"):
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "registry.toml"
        if candidate.is_file():
            return candidate
    return None


def load_registry(path: Path | None = None) -> Registry:
    """Read and validate the registry; an empty one when none is found."""
    path = path or registry_path()
    if path is None or not path.is_file():
        return Registry()
    with open(path, "rb") as fh:
        return Registry.model_validate(tomllib.load(fh))
