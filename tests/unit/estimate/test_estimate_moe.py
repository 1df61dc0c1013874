"""``deltatune estimate`` on mixture-of-experts models (Mixtral, Qwen3-MoE): the expert parameters are
counted, LoRA on them (``target_parameters``) and NF4 on them are sized as a real build holds them, the
published sizes of Mixtral-8x7B and Qwen3-30B-A3B come out, and the plain path's activation model
includes the experts each token visits."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from deltatune.estimate.activations import activation_bytes
from deltatune.estimate.counting import layout
from deltatune.estimate.memory import estimate, expert_transient
from deltatune.model.assembly import build_model, resolve_spec, trainable_summary
from deltatune.testing.families import TINY_FAMILIES
from saved_tensors import saved_bytes

EXPERT_LORA = {"name": "lora", "config": {"r": 4, "targets": "all-linear", "target_parameters": "all-experts"}}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("quantizer", [None, {"name": "nf4"}])
def test_meta_device_counts_equal_a_real_build(family, quantizer):
    resolved = resolve_spec({"base": "tiny-llama", "delta": [EXPERT_LORA], "quantizer": quantizer})
    real = build_model(resolved, TINY_FAMILIES[family]())
    trainable, _ = trainable_summary(real)
    quantized = sum(p.numel() * 2 for p in real.parameters() if getattr(p, "quant_type", None))
    total = sum(p.numel() for p in real.parameters() if not getattr(p, "quant_type", None)) + quantized
    lay = layout(TINY_FAMILIES[family]().config, resolved.deltas, resolved.quantizer)
    assert (lay.trainable, lay.total, lay.quantized) == (trainable, total, quantized)
    experts = real.get_submodule("model.layers.0.mlp.experts")
    assert lay.expert_weights == sum(experts.base_weight(p).numel() for p in ("gate_up_proj", "down_proj"))
    if quantizer:  # the experts are quantized too: almost every weight but the embeddings and the head
        assert lay.quantized > 0.5 * lay.total


def test_published_moe_sizes_and_lora_on_experts():
    mixtral = estimate("mixtral-8x7b", device="cuda")
    assert mixtral.total_params == 46_702_792_704  # 46.7B (Mistral AI's announcement)
    assert round(estimate("qwen3-30b-a3b", device="cuda").total_params / 1e9, 1) == 30.5  # Qwen3 model card
    r = 16
    qlora = estimate("mixtral-8x7b", [{"name": "lora", "config": {"r": r, "targets": "all-linear",
                                                                    "target_parameters": "all-experts"}}],
                     {"name": "nf4"}, device="cuda")
    attention = 2 * r * 4096 + 2 * r * (4096 + 1024) + 2 * r * 4096
    experts = 8 * r * ((4096 + 2 * 14336) + (14336 + 4096))
    assert qlora.trainable_params == 32 * (attention + experts)
    assert qlora.quantized_params == 46_702_792_704 - 2 * 32000 * 4096 - 32 * (8 * 4096 + 2 * 4096) - 4096
    # the experts in 4 bits: the weights fit in about a quarter of their bf16 size
    assert qlora.weights_quantized + qlora.weights_frozen < 0.3 * 2 * 46_702_792_704


def measured_and_predicted(family: str, dtype: str) -> tuple[float, float]:
    """Bytes of the tensors autograd keeps for a plain training forward, and the model's prediction."""
    if family == "mixtral":
        config = transformers.MixtralConfig(vocab_size=320, hidden_size=128, intermediate_size=160, num_hidden_layers=3,
                                            num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2)
    else:
        config = transformers.Qwen3MoeConfig(vocab_size=320, hidden_size=128, intermediate_size=320,
                                             moe_intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                                             num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    spec = {"base": "tiny-llama", "base_dtype": dtype,
            "delta": [{"name": "lora", "config": {"r": 8, "targets": ["q_proj", "v_proj"]}}]}
    measured, resolved = saved_bytes(spec, 2, 64, {}, fast=False,
                                     base=transformers.AutoModelForCausalLM.from_config(config).float())
    lay = layout(config, resolved.deltas, None, fast_path=False)
    predicted = activation_bytes(config, lay, 2, 64, 2 if dtype == "bf16" else 4, labelled=63 / 64)["total"]
    return measured, predicted


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_activation_model_of_a_moe_plain_forward(family, dtype):
    measured, predicted = measured_and_predicted(family, dtype)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


STEP_PEAK = """
import json, sys
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from deltatune.model.assembly import build_model, compute_context, resolve_spec

config = MixtralConfig(**json.loads(sys.argv[1]))
torch.manual_seed(0)
model = build_model(resolve_spec(json.loads(sys.argv[2])), MixtralForCausalLM(config))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ids = torch.randint(0, config.vocab_size, (1, 64))

def step():
    with compute_context(model):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

step()  # the optimizer's state exists from here on
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS:")
step()
print((kib("VmHWM:") - before) * 1024)
"""
MIXTRAL = dict(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)


@functools.cache
def step_peak(spec_json: str) -> int:
    """Bytes one training step of a random Mixtral built from ``spec_json`` takes above what stays resident
    between steps (every block mapped on its own, so resident memory follows the live tensors)."""
    out = subprocess.run([sys.executable, "-c", STEP_PEAK, json.dumps(MIXTRAL), spec_json], check=True,
                         capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("quantizer", [None, {"name": "nf4"}])
def test_expert_transient_against_a_measured_step(quantizer):
    """What LoRA on the experts adds to a step's peak (the effective expert weights computed again in
    backward, their fp32 dequantization, their dense gradient) is what the estimate's expert term says."""
    attention = {"r": 16, "targets": "all-linear"}
    experts = {**attention, "target_parameters": "all-experts"}
    # bf16 compute on every CPU (emulated where it has no bf16 products), as the predicted term assumes
    spec = {"base": "tiny-llama", "base_dtype": "bf16", "delta": [{"name": "lora", "config": experts}],
            "quantizer": quantizer}
    resolved = resolve_spec(spec)
    lay = layout(transformers.MixtralConfig(**MIXTRAL), resolved.deltas, resolved.quantizer)
    assert lay.experts_trained and lay.experts_quantized == bool(quantizer)
    predicted = expert_transient(lay, 2)
    attention_only = {"base": "tiny-llama", "base_dtype": "bf16", "delta": [{"name": "lora", "config": attention}]}
    measured = step_peak(json.dumps(spec)) - step_peak(json.dumps(attention_only))  # the baseline runs once
    assert abs(measured - predicted) <= 0.25 * predicted, (measured, predicted)
