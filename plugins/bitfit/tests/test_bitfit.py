"""BitFit: only biases train; bias-free models get zero biases (outputs unchanged) and say so; it
works on wrapped (LoRA) layers and on an NF4 base; merge is a no-op."""

from __future__ import annotations

import logging

import pytest
import torch

from deltatune.api import ConfigError
from deltatune.model.loading import tiny_llama
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec

LINEAR_PER_BLOCK = 7  # q k v o gate up down


def build(delta: list, quantizer: dict | None = None, **model_kw):
    resolved = resolve_spec(ModelSpec(base="tiny-llama", quantizer=quantizer, delta=delta, base_dtype="fp32"))
    return build_model(resolved, tiny_llama(**model_kw)), resolved


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_bias_free_model_gets_zero_biases_outputs_unchanged_and_it_is_reported(caplog) -> None:
    caplog.set_level(logging.INFO, logger="deltatune.bitfit")
    model, _ = build(["bitfit"])
    names = trainable(model)
    assert len(names) == 2 * LINEAR_PER_BLOCK and all(n.endswith(".bias") for n in names)
    assert "lm_head.bias" not in names
    batch = torch.arange(25).unsqueeze(0)
    assert torch.equal(model(input_ids=batch).logits, tiny_llama()(input_ids=batch).logits)
    assert "14 linear layers (0 existing, 14 added as zeros)" in caplog.text


def test_existing_biases_are_trained_and_none_added(caplog) -> None:
    caplog.set_level(logging.INFO, logger="deltatune.bitfit")
    model, _ = build(["bitfit"], attention_bias=True)
    names = trainable(model)
    assert len(names) == 2 * 4 and all(".self_attn." in n for n in names)  # auto: the MLP stays bias-free
    assert "(8 existing, 0 added" in caplog.text


def test_always_adds_missing_biases_and_never_refuses_a_bias_free_model() -> None:
    model, _ = build([{"name": "bitfit", "config": {"add_missing": "always"}}], attention_bias=True)
    assert len(trainable(model)) == 2 * LINEAR_PER_BLOCK
    with pytest.raises(ConfigError, match="add_missing"):
        build([{"name": "bitfit", "config": {"add_missing": "never"}}])


def test_a_training_step_changes_biases_only() -> None:
    model, _ = build([{"name": "bitfit", "config": {"targets": ["q_proj", "down_proj"]}}], attention_bias=True, mlp_bias=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{i}.{m}.bias" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}


@pytest.mark.parametrize("order", ["bitfit-first", "lora-first"])
def test_on_wrapped_layers_it_trains_the_base_layer_bias(order: str) -> None:
    lora = {"name": "lora", "config": {"targets": ["q_proj", "v_proj"]}}
    delta = ["bitfit", lora] if order == "bitfit-first" else [lora, "bitfit"]
    model, resolved = build(delta, attention_bias=True)
    names = set(trainable(model))
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in names
    assert "model.layers.0.self_attn.k_proj.bias" in names
    bitfit = next(d for d in resolved.deltas if d.name == "bitfit").plugin
    assert set(bitfit.state_dict(model)) == {n for n in names if n.endswith(".bias")}


def test_on_an_nf4_base_the_quantized_layers_bias_trains() -> None:
    model, _ = build(["bitfit"], quantizer={"name": "nf4", "config": {"compute_dtype": "fp32"}})
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.bias is not None and layer.bias.requires_grad
    batch = torch.arange(12).unsqueeze(0)
    model(input_ids=batch, labels=batch).loss.backward()
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0


def test_merge_and_unmerge_change_nothing() -> None:
    model, resolved = build(["bitfit"], attention_bias=True)
    with torch.no_grad():
        for name in trainable(model):
            model.get_parameter(name).normal_()
    batch = torch.arange(18).unsqueeze(0)
    before = model(input_ids=batch).logits
    resolved.deltas[0].plugin.merge(model)
    assert torch.equal(model(input_ids=batch).logits, before)
    resolved.deltas[0].plugin.unmerge(model)
    assert torch.equal(model(input_ids=batch).logits, before)
