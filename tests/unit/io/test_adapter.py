"""The adapter bundle: what ``deltatune.json`` records, an exact save/load round trip, the refusal of
tensors that do not fit the model, and atomic writes that never leave a partial folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.errors import ConfigError
from deltatune.errors import OutputError
from deltatune.io.atomic import MARKER
from deltatune.io.adapter import (MANIFEST, WEIGHTS, adapter_state, load_adapter, manifest, read_manifest,
                                  save_adapter)
from deltatune.model.assembly import build_model, resolve_spec
from deltatune.testing import isolated_manager

SPEC = {"base": "tiny-llama", "base_dtype": "fp32",
        "delta": [{"name": "lora", "config": {"r": 4, "targets": ["q_proj", "v_proj"]}},
                  {"name": "bitfit", "config": {"targets": ["o_proj"]}}]}
IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.fixture(scope="module")
def manager():
    return isolated_manager()


@pytest.fixture
def trained(manager):
    """A lora + bitfit model whose trainable tensors are all non-zero (as after training)."""
    resolved = resolve_spec(SPEC, manager)
    model = build_model(resolved)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval(), resolved


def test_manifest_records_base_plugins_with_full_options_and_versions(manager):
    resolved = resolve_spec(SPEC, manager)
    data = manifest(resolved)
    assert data["format"] == "deltatune-adapter" and data["format_version"] == 1
    assert data["core_version"] == deltatune.__version__
    assert (data["base"], data["base_dtype"], data["trainable_dtype"]) == ("tiny-llama", "fp32", "fp32")
    assert data["quantizer"] is None and data["weights"] == WEIGHTS
    lora, bitfit = data["delta"]
    assert lora["name"] == "lora" and bitfit["name"] == "bitfit"
    # every option, defaults included, so the bundle does not depend on later default changes
    assert lora["config"] == resolved.deltas[0].cfg.model_dump(mode="json")
    assert lora["config"]["r"] == 4 and "alpha" in lora["config"]
    assert bitfit["config"]["targets"] == ["o_proj"]
    assert lora["distribution"] == "deltatune-lora" and lora["version"]
    json.dumps(data)  # JSON as it is

    nf4 = manifest(resolve_spec({"base": "tiny-llama", "quantizer": "nf4", "delta": "lora"}, manager))["quantizer"]
    assert nf4["name"] == "nf4" and nf4["distribution"] == "deltatune-nf4" and "skip" in nf4["config"]
    assert manifest(resolve_spec({"base": "tiny-llama"}, manager))["weights"] == "model"


def test_save_then_load_reproduces_every_tensor_and_the_logits(trained, manager, tmp_path):
    model, resolved = trained
    folder = save_adapter(model, resolved, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, WEIGHTS, MARKER])
    assert read_manifest(folder) == manifest(resolved)

    saved = adapter_state(model, resolved)
    assert saved.keys() == load_file(str(folder / WEIGHTS)).keys()
    assert any(".deltas.lora." in k for k in saved) and any(k.endswith("o_proj.bias") for k in saved)

    reloaded, again = load_adapter(folder, manager=manager)
    assert [d.name for d in again.deltas] == ["lora", "bitfit"] and not reloaded.training
    restored = adapter_state(reloaded, again)
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def _rewrite(folder, change) -> None:
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def test_load_refuses_tensors_that_do_not_fit(trained, manager, tmp_path):
    model, resolved = trained
    key = "model.layers.0.self_attn.q_proj.deltas.lora.lora_A.weight"

    folder = save_adapter(model, resolved, tmp_path / "shape")
    _rewrite(folder, lambda state: state.update({key: torch.zeros(8, 64)}))
    with pytest.raises(ConfigError, match=rf"{key} has shape \(8, 64\), expected \(4, 64\)"):
        load_adapter(folder, manager=manager)

    folder = save_adapter(model, resolved, tmp_path / "missing")
    _rewrite(folder, lambda state: state.pop(key))
    with pytest.raises(ConfigError, match=r"does not fit .*missing \['model.layers.0.self_attn.q_proj"):
        load_adapter(folder, manager=manager)

    folder = save_adapter(model, resolved, tmp_path / "unexpected")
    _rewrite(folder, lambda state: state.update({"model.layers.0.mlp.up_proj.deltas.lora.lora_A.weight":
                                                 torch.zeros(4, 64)}))
    with pytest.raises(ConfigError, match=r"unexpected \['model.layers.0.mlp.up_proj"):
        load_adapter(folder, manager=manager)


def test_read_manifest_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ConfigError, match="deltatune.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not a deltatune adapter manifest"):
        read_manifest(tmp_path)


class FailingTokenizer:
    """A tokenizer whose save fails half-way, as on a full disk."""

    def save_pretrained(self, folder) -> None:
        (folder / "tokenizer.json").write_text("{")
        raise OSError("No space left on device")


def test_a_failed_save_leaves_the_previous_bundle_and_no_partial_folder(trained, manager, tmp_path):
    model, resolved = trained
    out = tmp_path / "adapter"
    save_adapter(model, resolved, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    full = resolve_spec({"base": "tiny-llama", "base_dtype": "fp32"}, manager)
    with pytest.raises(OutputError, match="No space left on device; the previous version is intact"):
        save_adapter(build_model(full), full, out, tokenizer=FailingTokenizer(), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary or half-written folder

    with pytest.raises(OutputError, match="No space left"):
        save_adapter(build_model(full), full, tmp_path / "fresh", tokenizer=FailingTokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
