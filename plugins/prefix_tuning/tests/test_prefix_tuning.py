"""Prefix-tuning against PEFT's PREFIX_TUNING: same logits, PEFT export and import; where the prefixes
start, against the base reading the start tokens first (generation, the generic forward and the merge
refusal: tests/integration/test_virtual_tokens.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import deltatune_prefix_tuning as prefix_tuning

from deltatune.api import ConfigError
from deltatune.io.adapter import load_adapter, save_adapter
from deltatune.io.peft import export_peft, load_peft_adapter
from deltatune.model.assembly import resolve_spec
from deltatune.model.loading import tiny_llama
from deltatune.testing import logits_of, max_relative_difference, sample_batch, text_started, trained_like


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


def followed_by(base, ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``base``'s logits of ``batch``'s tokens, each sequence read after the tokens ``ids``."""
    rows = batch["input_ids"].shape[0]
    joined = {"input_ids": torch.cat([ids.expand(rows, -1), batch["input_ids"]], dim=1),
              "attention_mask": torch.cat([torch.ones(rows, len(ids), dtype=torch.long), batch["attention_mask"]], dim=1)}
    return logits_of(base, joined)[:, len(ids):]


def test_text_start_makes_every_sequence_read_as_if_it_followed_the_text(plugin_manager, tiny_tokenizer, tmp_path):
    """``init: text``: before any step, the model is the base reading the text first (Li & Liang's start)."""
    model = text_started(plugin_manager, "prefix_tuning", tiny_tokenizer, tmp_path / "tokenizer", 5)
    text = tiny_tokenizer("Sort it")["input_ids"]
    ids = torch.tensor((text * 5)[:5])  # repeated or cut to the prefix's length
    batch = sample_batch(tiny_tokenizer)
    real = batch["attention_mask"].bool()
    expected = followed_by(tiny_llama(), ids, batch)
    assert max_relative_difference(logits_of(model, batch)[real], expected[real]) <= 1e-5
    assert max_relative_difference(logits_of(tiny_llama(), batch)[real], expected[real]) > 1e-3  # the text matters


def test_default_start_is_the_base_reading_tokens_drawn_from_its_vocabulary(tiny_tokenizer):
    base, model = tiny_llama(), tiny_llama()
    cfg = prefix_tuning.PrefixTuningConfig(num_virtual_tokens=6)
    assert cfg.init == "vocab"
    torch.manual_seed(11)
    prefix_tuning.PrefixTuning().apply(model, cfg)
    torch.manual_seed(11)
    ids = torch.randint(0, base.get_input_embeddings().num_embeddings, (6,))
    batch = sample_batch(tiny_tokenizer)
    real = batch["attention_mask"].bool()
    assert max_relative_difference(logits_of(model, batch)[real], followed_by(base, ids, batch)[real]) <= 1e-5


def test_reparameterisation_starts_at_random_and_refuses_a_set_start(plugin_manager):
    assert prefix_tuning.PrefixTuningConfig(prefix_projection=True).init == "random"
    with pytest.raises(ConfigError, match="(?s)prefix_tuning.*init: text.*prefix_projection"):
        resolve_spec({"base": "tiny-llama", "delta": [{"name": "prefix_tuning", "config": {
            "prefix_projection": True, "init": "text", "init_text": "Sort it"}}]}, plugin_manager)
