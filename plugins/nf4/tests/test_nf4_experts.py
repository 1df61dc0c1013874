"""NF4 on MoE expert parameters (transformers 5's 3-D expert weights): each expert's 2-D weight
quantized by bitsandbytes as a linear layer's, dequantized in the forward; QLoRA on the experts trains
only its pairs, and a merged export folds them into the dequantized experts."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch

from deltatune.deltas.experts import DeltaExperts
from deltatune.io.adapter import save_adapter
from deltatune.io.merged import merge_into_base
from deltatune.model.assembly import ModelSpec, apply_quantizer, build_model, resolve_spec
from deltatune.plugin.resolve import resolve
from deltatune.testing import adam_losses
from deltatune.testing import max_relative_difference as rel
from deltatune.testing.families import TINY_FAMILIES
from deltatune_nf4 import NF4Experts, memory_report

FAMILIES = ["mixtral", "qwen3_moe"]
NF4_FP32 = {"name": "nf4", "config": {"compute_dtype": "fp32"}}


def ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))


def quantize(model: torch.nn.Module, config: dict) -> None:
    """NF4 on ``model`` as a run applies it (the core marks what the quantizer produced)."""
    apply_quantizer(model, resolve("quantizer", {"name": "nf4", "config": config}))


def bnb_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own NF4 quantize → dequantize of each expert's weight (the oracle)."""
    slices = []
    for expert in weight:
        data, state = bnbF.quantize_4bit(expert.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
        slices.append(bnbF.dequantize_4bit(data, state))
    return torch.stack(slices)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_weights_are_quantized_per_expert_and_dequantized_in_the_forward(family: str) -> None:
    model, reference = TINY_FAMILIES[family](), TINY_FAMILIES[family]()
    quantize(model, {"compute_dtype": "fp32"})
    wrapped = [m for m in model.modules() if isinstance(m, DeltaExperts)]
    assert len(wrapped) == 2 and all(set(m.quantized) == {"gate_up_proj", "down_proj"} for m in wrapped)
    assert not any(p.ndim == 3 for p in model.parameters())  # no dense expert weight is left
    for name, module in model.named_modules():
        if isinstance(module, DeltaExperts):
            for param_name in ("gate_up_proj", "down_proj"):
                expected = bnb_roundtrip(getattr(reference.get_submodule(name), param_name).detach())
                assert torch.equal(module.base_weight(param_name), expected)
                with torch.no_grad():
                    getattr(reference.get_submodule(name), param_name).copy_(expected)
    # the reference also needs its linear layers quantized the same way: quantize it without experts
    quantize(reference, {"compute_dtype": "fp32", "experts": False})
    with torch.no_grad():
        assert rel(model(input_ids=ids()).logits, reference(input_ids=ids()).logits) <= 1e-5
    report = memory_report(model)
    experts_weights = sum(TINY_FAMILIES[family]().get_parameter(f"model.layers.{i}.mlp.experts.{p}").numel()
                          for i in (0, 1) for p in ("gate_up_proj", "down_proj"))
    assert report["weights"] == experts_weights + memory_report(reference)["weights"]
    assert 8 * report["packed"] == 4 * report["weights"]  # two 4-bit codes per byte, experts included


def test_experts_false_leaves_them_dense() -> None:
    model = TINY_FAMILIES["mixtral"]()
    quantize(model, {"experts": False})
    assert sum(p.ndim == 3 for p in model.parameters()) == 4
    assert not any(isinstance(m, (DeltaExperts, NF4Experts)) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_experts_trains_and_merges(family: str, tmp_path) -> None:
    resolved = resolve_spec(ModelSpec(base="tiny-llama", quantizer=NF4_FP32, base_dtype="fp32", delta=[
        {"name": "lora", "config": {"r": 2, "targets": ["q_proj"], "target_parameters": "all-experts"}}]))
    model = build_model(resolved, TINY_FAMILIES[family]())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("experts.deltas.lora.down_proj.lora_B" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = adam_losses(model, ids())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    experts = model.get_submodule("model.layers.0.mlp.experts").deltas["lora"]
    assert all(delta.lora_B.weight.abs().sum() > 0 for delta in experts.values())  # the expert pairs trained
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids()).logits
        merge_into_base(model, resolved)
        assert not any(isinstance(m, (DeltaExperts, NF4Experts)) for m in model.modules())
        assert sum(p.ndim == 3 for p in model.parameters()) == 4
        assert rel(model(input_ids=ids()).logits, logits) <= 1e-4
