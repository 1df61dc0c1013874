"""What is specific to this example: its entry point, and what its vectors compute."""

from __future__ import annotations

from importlib.metadata import entry_points

import torch

from deltatune.model.assembly import build_model, resolve_spec
from deltatune.testing import logits_of, sample_batch


def test_the_installed_entry_point_provides_scaled_activations(plugin_manager):
    points = {ep.name: ep for ep in entry_points(group="deltatune")}
    point = points["scaled_activations"]
    assert point.value == "deltatune_scaled_activations" and point.dist.name == "deltatune-scaled-activations"
    assert plugin_manager.get("delta_method", "scaled_activations").distribution == "deltatune-scaled-activations"


def test_a_scale_multiplies_the_layer_output(plugin_manager, tiny_tokenizer):
    spec = {"base": "tiny-llama", "base_dtype": "fp32",
            "delta": [{"name": "scaled_activations", "config": {"targets": ["v_proj"]}}]}
    model = build_model(resolve_spec(spec, plugin_manager))
    batch = sample_batch(tiny_tokenizer)
    before = logits_of(model, batch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.fill_(2.0)
        for name, module in model.named_modules():
            if name.endswith("v_proj.base_layer"):
                module.weight.mul_(0.5)
    torch.testing.assert_close(logits_of(model, batch), before, rtol=1e-5, atol=1e-5)
