"""Configuration errors are specific and happen before any weight is loaded."""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError, ModelNotFoundError
from deltatune.train.module import DeltaTuneModule
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec


def test_invalid_option_names_plugin_field_and_allowed_values():
    with pytest.raises(ConfigError) as error:
        resolve_spec(ModelSpec(base="does-not-exist", delta=[{"name": "lora", "config": {"r": -1, "rank": 4}}]))
    message = str(error.value)
    assert "delta method 'lora'" in message
    assert "r: Input should be greater than 0" in message
    assert "rank: unknown option, did you mean 'r'?" in message
    assert "valid options: r, " in message and "alpha" in message
    assert "\n" not in message  # one line
    with pytest.raises(ConfigError, match="template: Input should be 'auto', 'chat' or 'alpaca'"):
        from deltatune.plugin.resolve import resolve

        resolve("dataset_builder", {"name": "alpaca", "config": {"path": "x.jsonl", "template": "vicuna"}})


def test_unknown_option_suggests_the_closest_field():
    from deltatune.plugin.resolve import resolve

    with pytest.raises(ConfigError, match=r"optimizer 'adamw': learning_rate: unknown option, did you mean 'lr'\?"):
        resolve("optimizer", {"name": "adamw", "config": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"lora': alpah: unknown option, did you mean 'alpha'\?"):
        resolve("delta_method", {"name": "lora", "config": {"alpah": 8}})
    with pytest.raises(ConfigError) as error:
        resolve("delta_method", {"name": "lora", "config": {"zzzz": 1}})
    assert "did you mean" not in str(error.value) and "valid options: r, " in str(error.value)


def test_module_validates_plugins_without_loading_the_model():
    # the base does not exist: construction must still fail on the plugin option first
    with pytest.raises(ConfigError, match="adamw"):
        DeltaTuneModule(base="/no/such/model", delta=["lora"], optimizer={"name": "adamw", "config": {"lr": -1}})
    # then the base's config (never its weights): a missing base fails at construction
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        DeltaTuneModule(base="/no/such/model", delta=["lora"])
    assert DeltaTuneModule(base="tiny-llama", delta=["lora"]).model is None


def test_targets_that_match_nothing_list_existing_modules():
    resolved = resolve_spec(ModelSpec(base="tiny-llama", delta=[{"name": "lora", "config": {"targets": ["query"]}}]))
    with pytest.raises(ConfigError, match=r"lora: target 'query' matches no linear module.*q_proj"):
        build_model(resolved)


def test_no_delta_method_means_full_fine_tuning():
    resolved = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="fp32"))
    assert resolved.full_finetune
    model = build_model(resolved)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_claims_only_its_parameters_and_starts_as_a_no_op():
    resolved = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="fp32", delta=["lora"]))
    model = build_model(resolved)
    from deltatune.model.loading import tiny_llama

    reference = tiny_llama()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".deltas.lora." in n for n in trainable)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_bf16_base_keeps_trainable_weights_in_fp32():
    resolved = resolve_spec(ModelSpec(base="tiny-llama", base_dtype="bf16", delta=["lora"]))
    model = build_model(resolved)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name


def test_the_same_method_twice_is_an_error():
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_spec(ModelSpec(base="tiny-llama", delta=["lora", "lora"]))
