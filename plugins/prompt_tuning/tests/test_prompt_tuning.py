"""Prompt tuning and P-tuning against PEFT's PROMPT_TUNING / P_TUNING: same logits and loss, PEFT export
and import, text initialisation (generation, the generic forward and the merge refusal:
tests/integration/test_virtual_tokens.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

from deltatune.api import ConfigError, virtual_tokens
from deltatune.io.adapter import load_adapter, save_adapter
from deltatune.io.peft import export_peft, load_peft_adapter
from deltatune.model.assembly import build_model, resolve_spec
from deltatune.model.loading import tiny_llama
from deltatune.testing import logits_of, max_relative_difference, sample_batch, text_started, trained_like

CASES = [("prompt_tuning", {"num_virtual_tokens": 4}),
         ("p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}),
         ("p_tuning", {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8})]
IDS = ["prompt", "p-mlp", "p-lstm"]


def prompt_model(plugin_manager, name="prompt_tuning", config=None):
    return trained_like(plugin_manager, [{"name": name, "config": config or {"num_virtual_tokens": 4}}])


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_exported_adapter_loads_in_peft_and_back_with_the_same_logits(plugin_manager, tiny_tokenizer, tmp_path, name, config):
    model, resolved = prompt_model(plugin_manager, name, config)
    batch = sample_batch(tiny_tokenizer)
    expected = logits_of(model, batch)
    assert expected.shape == logits_of(tiny_llama(), batch).shape  # the virtual tokens have no logits
    assert max_relative_difference(expected, logits_of(tiny_llama(), batch)) > 1e-3
    save_adapter(model, resolved, tmp_path / "adapter")
    reloaded, _ = load_adapter(tmp_path / "adapter", manager=plugin_manager)
    assert max_relative_difference(logits_of(reloaded, batch), expected) <= 1e-5
    export_peft(tmp_path / "adapter", tmp_path / "peft", manager=plugin_manager)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    virtual = config["num_virtual_tokens"]
    assert max_relative_difference(logits_of(peft_model, batch)[:, virtual:], expected) <= 1e-4
    imported, imported_spec = load_peft_adapter(tmp_path / "peft", base="tiny-llama", manager=plugin_manager)
    assert imported_spec.deltas[0].name == name
    assert max_relative_difference(logits_of(imported, batch), expected) <= 1e-5


def test_the_loss_equals_peft_with_the_virtual_tokens_unlabelled(plugin_manager, tiny_tokenizer, tmp_path):
    """deltatune's training loss (labels of the real tokens only) is PEFT's loss (virtual labels -100) when
    the first token carries no label, as in every builder's rows (the prompt is masked): PEFT would also
    predict a labelled first token from the last virtual token, deltatune never predicts the first token."""
    from deltatune.train.loss import mean_loss

    model, resolved = prompt_model(plugin_manager)
    save_adapter(model, resolved, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft", manager=plugin_manager)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    batch = sample_batch(tiny_tokenizer)
    batch["labels"][:, 0] = -100
    with torch.no_grad():
        ours = mean_loss(model, batch)
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_text_initialisation_is_peft_s(plugin_manager, tiny_tokenizer, tmp_path):
    model = text_started(plugin_manager, "prompt_tuning", tiny_tokenizer, tmp_path / "tokenizer", 7)
    peft_model = get_peft_model(tiny_llama(), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="Sort it", tokenizer_name_or_path=str(tmp_path / "tokenizer")))
    ours = virtual_tokens(model).table()
    torch.testing.assert_close(ours, peft_model.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)


def test_vocabulary_initialisation_takes_the_base_s_embeddings_of_drawn_tokens(plugin_manager):
    """``init: vocab`` (PEFT's SAMPLE_VOCAB): the base's embeddings of tokens drawn with torch's generator."""
    import deltatune_prompt_tuning as prompt_tuning

    model = tiny_llama()
    cfg = prompt_tuning.PromptTuningConfig(num_virtual_tokens=6, init="vocab")
    torch.manual_seed(4)
    tokens = prompt_tuning.PromptTuning().make_tokens(model, cfg)
    torch.manual_seed(4)
    embedding = model.get_input_embeddings().weight
    ids = torch.randint(0, embedding.shape[0], (6,))
    torch.testing.assert_close(tokens.table(), embedding[ids], rtol=0, atol=0)


def test_text_initialisation_needs_a_text(plugin_manager):
    with pytest.raises(ConfigError, match="(?s)prompt_tuning.*init_text"):
        resolve_spec({"base": "tiny-llama", "delta": [{"name": "prompt_tuning", "config": {"init": "text"}}]}, plugin_manager)


def test_prompt_and_prefix_together_are_refused_naming_both(plugin_manager):
    spec = {"base": "tiny-llama", "delta": [{"name": "prompt_tuning"}, {"name": "prefix_tuning"}]}
    with pytest.raises(ConfigError, match="'prompt_tuning' and 'prefix_tuning'"):
        build_model(resolve_spec(spec, plugin_manager))


def test_starts_from_a_p_tuning_adapter_peft_trained_with_its_encoder(plugin_manager, tiny_tokenizer, tmp_path):
    peft_model = get_peft_model(tiny_llama(), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_hidden_size=12))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.add_(0.2 * torch.randn_like(param))
    batch = sample_batch(tiny_tokenizer)
    expected = logits_of(peft_model, batch)[:, 5:]
    peft_model.save_pretrained(tmp_path / "peft")
    model, resolved = load_peft_adapter(tmp_path / "peft", base="tiny-llama", manager=plugin_manager)
    assert resolved.deltas[0].name == "p_tuning" and resolved.deltas[0].cfg.num_virtual_tokens == 5
    assert max_relative_difference(logits_of(model, batch), expected) <= 1e-4
