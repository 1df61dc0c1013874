"""What is specific to IA3: it computes what PEFT's IA3 computes, and its adapters export to PEFT."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from deltatune.api import ConfigError
from deltatune.io.adapter import save_adapter
from deltatune.model.loading import tiny_llama
from deltatune.model.assembly import build_model, resolve_spec
from deltatune.testing import logits_of, sample_batch

TARGETS = ["k_proj", "v_proj", "down_proj"]


def ia3_model(plugin_manager, targets=TARGETS, feedforward=("down_proj",), seed=1):
    """An IA3 model with random (seeded) vectors, fp32."""
    spec = {"base": "tiny-llama", "base_dtype": "fp32",
            "delta": [{"name": "ia3", "config": {"targets": targets, "feedforward": list(feedforward)}}]}
    resolved = resolve_spec(spec, plugin_manager)
    model = build_model(resolved)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return model, resolved


def peft_ia3(model):
    """PEFT's IA3 on a fresh tiny Llama, with the vectors of our ``model``."""
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=True)
    peft_model = get_peft_model(tiny_llama(), config)
    ours = {k.replace(".deltas.ia3.ia3_l", ""): v for k, v in model.state_dict().items() if ".deltas.ia3." in k}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "ia3_l") and "default" in module.ia3_l:
                module.ia3_l["default"].copy_(ours[name])
    return peft_model


def test_the_installed_entry_point_provides_ia3(plugin_manager):
    points = {ep.name: ep for ep in entry_points(group="deltatune")}
    assert points["ia3"].value == "deltatune_ia3" and points["ia3"].dist.name == "deltatune-ia3"
    info = plugin_manager.get("delta_method", "ia3")
    assert info.distribution == "deltatune-ia3"


def test_logits_and_gradients_match_peft(plugin_manager, tiny_tokenizer):
    model, _ = ia3_model(plugin_manager)
    peft_model = peft_ia3(model)
    batch = sample_batch(tiny_tokenizer)
    torch.testing.assert_close(logits_of(model, batch), logits_of(peft_model, batch), rtol=1e-5, atol=1e-5)
    for m in (model, peft_model):
        m.train()
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    ours = {k.replace(".deltas.ia3.ia3_l", ""): p.grad for k, p in model.named_parameters() if p.requires_grad}
    theirs = {k.replace("base_model.model.", "").replace(".ia3_l.default", ""): p.grad
              for k, p in peft_model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_shapes_say_which_side_is_scaled(plugin_manager):
    model, _ = ia3_model(plugin_manager)
    shapes = {k.split(".")[-4]: tuple(v.shape) for k, v in model.state_dict().items() if ".deltas.ia3." in k}
    assert shapes == {"k_proj": (32, 1), "v_proj": (32, 1), "down_proj": (1, 96)}
    assert sum(v.numel() for k, v in model.state_dict().items() if ".deltas.ia3." in k) == 2 * (32 + 32 + 96)


def test_exported_adapter_loads_in_peft_with_the_same_logits(plugin_manager, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from deltatune.io.peft import export_peft

    model, resolved = ia3_model(plugin_manager)
    save_adapter(model, resolved, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft", manager=plugin_manager)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    batch = sample_batch(tiny_tokenizer)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, batch), rtol=1e-5, atol=1e-5)


def test_a_feedforward_pattern_outside_the_targets_is_an_error(plugin_manager):
    with pytest.raises(ConfigError, match="ia3: feedforward 'down_proj' matches none"):
        ia3_model(plugin_manager, targets=["k_proj", "v_proj"])


def test_sharing_a_layer_with_lora_is_an_error_naming_both(plugin_manager):
    spec = {"base": "tiny-llama", "delta": [{"name": "ia3", "config": {"targets": ["v_proj"], "feedforward": []}},
                                            {"name": "lora", "config": {"targets": ["v_proj"]}}]}
    with pytest.raises(ConfigError, match="'ia3' and 'lora'.*v_proj"):
        build_model(resolve_spec(spec, plugin_manager))
