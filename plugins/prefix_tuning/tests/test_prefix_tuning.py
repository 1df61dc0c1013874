"""Prefix-tuning against PEFT's PREFIX_TUNING: same logits, PEFT export and import (generation, the
generic forward and the merge refusal: tests/integration/test_virtual_tokens.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from deltatune.io.adapter import load_adapter, save_adapter
from deltatune.io.peft import export_peft, load_peft_adapter
from deltatune.model.loading import tiny_llama
from deltatune.testing import logits_of, max_relative_difference, sample_batch, trained_like


def prefix_model(plugin_manager, config):
    return trained_like(plugin_manager, [{"name": "prefix_tuning", "config": config}])


@pytest.mark.parametrize("config", [{"num_virtual_tokens": 4},
                                    {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}])
def test_exported_adapter_loads_in_peft_and_back_with_the_same_logits(plugin_manager, tiny_tokenizer, tmp_path, config):
    model, resolved = prefix_model(plugin_manager, config)
    batch = sample_batch(tiny_tokenizer)
    expected = logits_of(model, batch)
    assert max_relative_difference(expected, logits_of(tiny_llama(), batch)) > 1e-3  # the prefix changes the logits
    save_adapter(model, resolved, tmp_path / "adapter")
    reloaded, _ = load_adapter(tmp_path / "adapter", manager=plugin_manager)
    assert max_relative_difference(logits_of(reloaded, batch), expected) <= 1e-5
    export_peft(tmp_path / "adapter", tmp_path / "peft", manager=plugin_manager)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert max_relative_difference(logits_of(peft_model, batch), expected) <= 1e-4
    imported, _ = load_peft_adapter(tmp_path / "peft", base="tiny-llama", manager=plugin_manager)
    assert max_relative_difference(logits_of(imported, batch), expected) <= 1e-5


def test_starts_from_an_adapter_peft_trained_with_its_reparameterisation(plugin_manager, tiny_tokenizer, tmp_path):
    peft_model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                                 prefix_projection=True, encoder_hidden_size=12))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.add_(0.2 * torch.randn_like(param))
    batch = sample_batch(tiny_tokenizer)
    expected = logits_of(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    model, resolved = load_peft_adapter(tmp_path / "peft", base="tiny-llama", manager=plugin_manager)
    cfg = resolved.deltas[0].cfg
    assert (cfg.num_virtual_tokens, cfg.prefix_projection, cfg.encoder_hidden_size) == (5, True, 12)  # adopted
    assert max_relative_difference(logits_of(model, batch), expected) <= 1e-4
