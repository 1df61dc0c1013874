"""Shared fixtures for the core tests: fake installed distributions for plugin-loading tests."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Create a real (file-based) installed distribution with ``deltatune`` entry points.

    ``fake_dist(dist, version, {entry_name: module_source})`` writes the modules and a
    ``.dist-info`` folder on a temporary ``sys.path`` entry, so ``importlib.metadata`` finds them
    exactly as it finds pip-installed plugins.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))

    def make(dist: str, version: str, modules: dict[str, str]) -> None:
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = ["[deltatune]"]
        for entry, source in modules.items():
            module = f"fake_{dist.replace('-', '_')}_{entry}"
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            lines.append(f"{entry} = {module}")
            sys.modules.pop(module, None)
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    return make


@pytest.fixture(scope="module")
def biased_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Hugging Face folder holding a tiny Llama with attention and MLP biases (and a tokenizer)."""
    from deltatune.model.loading import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("biased-base")
    tiny_llama(attention_bias=True, mlp_bias=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)
