"""PEFT export and import (core/deltatune/io/peft.py), with PEFT itself as the oracle: our adapters
load in PEFT with the same logits, PEFT adapters trained elsewhere start a deltatune run, and what
PEFT cannot express is a clear error. (Merged export: test_export_merged.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model

from adapter_cases import DORA_MLP, LORA_ATTN, ids, trained_adapter
from deltatune.errors import ConfigError
from deltatune.io.adapter import load_adapter, save_adapter
from deltatune.io.peft import build_with_peft_init, export_peft, load_peft_adapter, resolve_with_peft_init
from deltatune.model.loading import load_model, tiny_llama
from deltatune.model.assembly import ModelSpec
from deltatune.testing import max_relative_difference as rel

# -- PEFT export ------------------------------------------------------------------------------------
PEFT_CASES = {
    "lora": ([{"name": "lora", "config": {"r": 4, "alpha": 8, "targets": "all-linear"}}], False, 1e-6),
    "rslora": ([{"name": "lora", "config": {"r": 4, "alpha": 8, "targets": "all-linear", "rslora": True}}], False, 1e-6),
    "dora": ([DORA_MLP], False, 1e-5),
    "vera": ([{"name": "vera", "config": {"r": 8, "targets": ["q_proj", "k_proj", "down_proj"]}}], False, 1e-5),
    "lora+bitfit": ([LORA_ATTN, "bitfit"], True, 1e-6),
    "bitfit+dora": (["bitfit", DORA_MLP], True, 1e-5),
    "vera+bitfit": ([{"name": "vera", "config": {"r": 8}}, "bitfit"], True, 1e-5),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_export_gives_the_same_logits_in_peft(tmp_path, biased_base, case) -> None:
    delta, biased, tolerance = PEFT_CASES[case]
    base = biased_base if biased else "tiny-llama"
    model, _ = trained_adapter(tmp_path / "adapter", delta, base)
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base
    assert all(t.startswith("model.layers.") for t in config["target_modules"])  # exact wrapped-layer names
    assert config["bias"] == ("all" if "bitfit" in case else "none")
    peft = PeftModel.from_pretrained(load_model(base), out).eval()
    with torch.no_grad():
        assert rel(peft(input_ids=ids()).logits, model(input_ids=ids()).logits) <= tolerance


@pytest.mark.parametrize("delta, why", [
    ([LORA_ATTN, DORA_MLP], "lora and dora would each need their own PEFT adapter"),
    (["bitfit"], "none of them is a PEFT adapter type"),
    ([LORA_ATTN, "bitfit"], "bitfit added biases to 14 layers"),  # tiny-llama has no biases
])
def test_peft_export_refuses_what_peft_cannot_express_and_suggests_merged(tmp_path, delta, why) -> None:
    trained_adapter(tmp_path / "adapter", delta)
    with pytest.raises(ConfigError, match="--format merged") as error:
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert why in str(error.value)
    assert not (tmp_path / "peft").exists()


# -- PEFT import ------------------------------------------------------------------------------------
def peft_adapter(folder: Path, kind: str):
    """An adapter trained elsewhere: PEFT's own model with random (non-zero) weights, saved by PEFT."""
    config = {
        "lora": LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"]),
        "rslora": LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj"], use_rslora=True),
        "dora": LoraConfig(r=5, lora_alpha=10, target_modules=["k_proj", "up_proj"], use_dora=True),
        "vera": VeraConfig(r=16, target_modules=["v_proj", "gate_proj"], projection_prng_key=3),
    }[kind]
    peft = get_peft_model(tiny_llama(), config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, param in sorted(peft.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    peft.save_pretrained(folder)
    return peft.eval()


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera"])
def test_a_peft_adapter_trained_elsewhere_loads_with_its_logits(tmp_path, kind) -> None:
    peft = peft_adapter(tmp_path / "peft", kind)
    model, resolved = load_peft_adapter(tmp_path / "peft", base="tiny-llama")
    assert resolved.deltas[0].name == ("lora" if kind == "rslora" else kind)
    with torch.no_grad():
        assert rel(model(input_ids=ids()).logits, peft(input_ids=ids()).logits) <= 1e-5


def test_init_from_adopts_options_and_a_saved_run_no_longer_needs_the_peft_folder(tmp_path) -> None:
    peft = peft_adapter(tmp_path / "peft", "dora")
    spec = ModelSpec(base="tiny-llama", base_dtype="fp32",
                     delta=[{"name": "dora", "config": {"init_from": str(tmp_path / "peft"), "dropout": 0.1}}])
    resolved = resolve_with_peft_init(spec)
    cfg = resolved.deltas[0].cfg
    assert (cfg.r, cfg.alpha, cfg.dropout, sorted(cfg.targets)) == (5, 10, 0.1, ["k_proj", "up_proj"])
    model = build_with_peft_init(resolved).eval()
    save_adapter(model, resolved, tmp_path / "adapter")
    shutil.rmtree(tmp_path / "peft")
    reloaded, _ = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft(input_ids=ids()).logits
        assert rel(reloaded(input_ids=ids()).logits, expected) <= 1e-5


@pytest.mark.parametrize("config, message", [
    ({"name": "lora"}, "PEFT dora adapter .* with delta method 'dora', not 'lora'"),
    ({"name": "dora", "config": {"alpha": 16}}, "lora_alpha=16.0 but the PEFT adapter .* lora_alpha=10"),
    ({"name": "dora", "config": {"targets": ["k_proj"]}}, "for modules this configuration does not target"),
    ({"name": "dora", "config": {"targets": ["k_proj", "up_proj", "q_proj"]}}, "lacks 6 tensor"),
])
def test_init_from_mismatches_are_clear_errors(tmp_path, config, message) -> None:
    peft_adapter(tmp_path / "peft", "dora")
    ref = {"name": config["name"], "config": {**config.get("config", {}), "init_from": str(tmp_path / "peft")}}
    with pytest.raises(ConfigError, match=message):
        build_with_peft_init(resolve_with_peft_init(ModelSpec(base="tiny-llama", delta=[ref])))
