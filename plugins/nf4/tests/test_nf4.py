"""Tests of the nf4 quantizer with bitsandbytes' real CPU kernels (no mocks)."""

from __future__ import annotations

import copy
import logging
import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import deltatune_nf4
from deltatune.api import ConfigError, Quantizer
from deltatune.plugin.resolve import resolve
from deltatune.plugin.manager import PluginManager
from deltatune.model.assembly import cpu_supports_bf16
from deltatune_nf4 import (
    NF4,
    NF4Config,
    dequantize_weight,
    is_quantized,
    memory_report,
    quantization_error,
    requantize,
    resolve_compute_dtype,
    storage_bytes,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).float().eval()


def normal(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def quantized_linear(weight: torch.Tensor, bias: bool = True, **options) -> bnb.nn.Linear4bit:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    model = nn.Sequential(linear)
    NF4().quantize(model, NF4Config(**options))
    assert is_quantized(model[0])
    return model[0]


# -- the quantization itself -----------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
def test_matches_bitsandbytes_reference_on_normal_weights(double_quant):
    weight = normal(256, 512)
    layer = quantized_linear(weight, double_quant=double_quant, compute_dtype="fp32")

    ref_packed, ref_state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    reference = F.dequantize_4bit(ref_packed, ref_state)
    assert torch.equal(layer.weight.data, ref_packed)
    assert layer.weight.quant_state.nested is double_quant
    assert layer.weight.quant_state.blocksize == 64
    dense = dequantize_weight(layer)
    assert dense.dtype == torch.float32 and dense.shape == weight.shape
    assert torch.equal(dense, reference)

    error = quantization_error(weight, layer)
    assert error == quantization_error(weight, reference)
    # NF4 on N(0, 1) with blocks of 64: ~9.2 % relative error, mean |error| ~0.073
    assert 0.085 < error["relative"] < 0.10
    assert 0.068 < error["mean_abs"] < 0.078
    assert error["max_abs"] < 0.75


def test_nf4_beats_fp4_and_double_quant_costs_little():
    weight = normal(256, 512, seed=1)
    nf4 = quantization_error(weight, quantized_linear(weight, double_quant=False))["relative"]
    nf4_dq = quantization_error(weight, quantized_linear(weight, double_quant=True))["relative"]
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="fp4")
    fp4 = quantization_error(weight, F.dequantize_4bit(packed, state))["relative"]
    assert nf4 < 0.8 * fp4
    assert nf4 <= nf4_dq < nf4 + 1e-3


@pytest.mark.parametrize("blocksize", [32, 128])
def test_other_blocksizes(blocksize):
    weight = normal(64, 256, seed=2)
    layer = quantized_linear(weight, blocksize=blocksize)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    assert torch.equal(dequantize_weight(layer), F.dequantize_4bit(packed, state))


def test_bf16_base_weights_quantize_like_bitsandbytes():
    weight = normal(96, 64, seed=3).bfloat16()
    layer = quantized_linear(weight, bias=False)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.weight.data, packed)
    assert torch.equal(dequantize_weight(layer, torch.bfloat16), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [True, False])
def test_layer_holds_packed_uint8_and_forward_matches_dequantized_matmul(double_quant):
    weight = normal(96, 128, seed=4) * 0.05
    layer = quantized_linear(weight, double_quant=double_quant, compute_dtype="fp32")
    n = weight.numel()
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == n // 2
    assert not layer.weight.requires_grad
    parts = storage_bytes(layer)
    assert parts["packed"] == n // 2
    blocks = n // 64
    assert parts["absmax"] == (blocks if double_quant else 4 * blocks)
    assert parts["double_quant"] == ((4 * math.ceil(blocks / 256) + 4) if double_quant else 0)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")

    x = torch.randn(3, 5, 128)
    expected = x @ dequantize_weight(layer).T + layer.bias
    layer.train()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)


def test_bf16_compute_dtype_forward():
    weight = normal(64, 128, seed=5) * 0.05
    layer = quantized_linear(weight, bias=False, compute_dtype="bf16")
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(4, 128)
    expected = x @ dequantize_weight(layer).T
    out = layer(x)
    assert out.dtype == torch.float32
    assert ((out - expected).norm() / expected.norm()) < 1e-2


def test_auto_compute_dtype_follows_the_cpu():
    expected = torch.bfloat16 if cpu_supports_bf16() else torch.float32  # the core's detection
    assert resolve_compute_dtype("auto", "cpu") == expected
    assert quantized_linear(normal(32, 64)).compute_dtype == expected
    assert resolve_compute_dtype("fp32") == torch.float32 and resolve_compute_dtype("bf16") == torch.bfloat16


def test_gradients_flow_to_inputs_not_to_the_4bit_weight():
    weight = normal(64, 64, seed=6) * 0.05
    layer = quantized_linear(weight, compute_dtype="fp32")
    layer.train()
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, dequantize_weight(layer).sum(0).expand(2, -1), atol=1e-5)
    assert layer.weight.grad is None
    assert layer.bias.grad is not None  # the bias stays a normal (trainable if claimed) parameter


# -- choosing layers -------------------------------------------------------------------------------
def test_default_quantizes_all_projections_and_keeps_head_and_embeddings():
    model = tiny_llama()
    head, embed = model.lm_head.weight.detach().clone(), model.model.embed_tokens.weight.detach().clone()
    NF4().quantize(model, NF4Config())
    quantized = [name for name, m in model.named_modules() if is_quantized(m)]
    assert len(quantized) == 2 * len(PROJECTIONS)
    assert {name.rsplit(".", 1)[-1] for name in quantized} == set(PROJECTIONS)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head)
    assert type(model.model.embed_tokens) is nn.Embedding and torch.equal(model.model.embed_tokens.weight, embed)


def test_targets_and_skip():
    model = tiny_llama()
    NF4().quantize(model, NF4Config(targets=["q_proj", "re:.*mlp\\.(up|down)_proj"], skip=["layers.1.mlp.down_proj"]))
    quantized = sorted(name for name, m in model.named_modules() if is_quantized(m))
    assert quantized == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]

    model = tiny_llama()
    NF4().quantize(model, {"skip": ["mlp.down_proj", "o_proj"]})
    assert not any(is_quantized(m) for name, m in model.named_modules() if name.endswith(("down_proj", "o_proj")))
    assert sum(is_quantized(m) for m in model.modules()) == 2 * 5


def test_lm_head_only_when_asked_and_never_when_tied(caplog):
    model = tiny_llama()
    NF4().quantize(model, {"targets": ["lm_head"], "skip": []})
    assert is_quantized(model.lm_head) and not is_quantized(model.model.layers[0].self_attn.q_proj)

    tied = tiny_llama(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with caplog.at_level(logging.WARNING, logger="deltatune_nf4"):
        NF4().quantize(tied, {"targets": ["lm_head", "q_proj"], "skip": []})
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head" in caplog.text and "tied" in caplog.text
    assert is_quantized(tied.model.layers[0].self_attn.q_proj)


def test_unknown_target_names_it_and_lists_what_exists():
    with pytest.raises(ConfigError, match=r"target 'qkv_proj' matches no linear module.*q_proj"):
        NF4().quantize(tiny_llama(), {"targets": ["qkv_proj"]})
    with pytest.raises(ConfigError, match="no linear layer left"):
        NF4().quantize(tiny_llama(), {"targets": ["q_proj"], "skip": ["q_proj"]})


def test_quantizing_twice_changes_nothing():
    model = tiny_llama()
    NF4().quantize(model, {})
    layer = model.model.layers[0].self_attn.q_proj
    packed = layer.weight.data.clone()
    NF4().quantize(model, {})
    assert model.model.layers[0].self_attn.q_proj is layer and torch.equal(layer.weight.data, packed)


def test_meta_weights_are_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ConfigError, match="meta device"):
        NF4().quantize(model, {})


def test_is_quantized():
    model = tiny_llama()
    NF4().quantize(model, {})
    assert NF4().is_quantized(model.model.layers[0].mlp.up_proj)
    assert not NF4().is_quantized(model.lm_head)
    assert not NF4().is_quantized(model.model.embed_tokens)
    fp4 = bnb.nn.LinearFP4(64, 64)
    fp4.weight = bnb.nn.Params4bit(torch.randn(64, 64), quant_type="fp4", module=fp4).to("cpu")
    assert not NF4().is_quantized(fp4)
    with pytest.raises(TypeError, match="not an NF4"):
        dequantize_weight(model.lm_head)


# -- the whole model -------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_dtype,tolerance", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_quantized_llama_stays_close_to_fp32(compute_dtype, tolerance):
    model = tiny_llama()
    original = copy.deepcopy(model)
    NF4().quantize(model, {"compute_dtype": compute_dtype})

    # the dense model with every quantized weight replaced by its dequantized value
    fake = copy.deepcopy(original)
    for name, module in model.named_modules():
        if is_quantized(module):
            with torch.no_grad():
                fake.get_submodule(name).weight.copy_(dequantize_weight(module))

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = original(ids, labels=ids)
        simulated = fake(ids).logits
        quantized = model(ids, labels=ids)
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert relative(quantized.logits, simulated) < tolerance
    # NF4 moves each weight ~9 % (relative); the logits move about as much, and the loss barely
    assert relative(quantized.logits, exact.logits) < 0.15
    assert abs(quantized.loss.item() - exact.loss.item()) < 0.01 * exact.loss.item()
    assert torch.nn.functional.cosine_similarity(quantized.logits.flatten(), exact.logits.flatten(), dim=0) > 0.99


def test_quantized_llama_trains_a_head_through_4bit_layers():
    model = tiny_llama()
    NF4().quantize(model, {})
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, 300, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # gradient went through every 4-bit layer


@pytest.mark.parametrize("double_quant", [True, False])
def test_memory_of_the_tiny_llama(double_quant):
    model = tiny_llama()
    NF4().quantize(model, {"double_quant": double_quant})
    report = memory_report(model)
    weights = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 96 * 3)
    assert report["layers"] == 14 and report["weights"] == weights
    assert report["bf16"] == 2 * weights
    assert report["packed"] == weights // 2
    assert report["absmax"] == (weights // 64) * (1 if double_quant else 4)
    without_tables = (report["total"] - report["code_tables"]) / report["bf16"]
    # 4 + 8/64 (+ one fp32 per 256 blocks and an offset, per layer) bits vs 4 + 32/64 bits, of 16
    assert without_tables == pytest.approx(0.2578 if double_quant else 0.28125, abs=2e-3)
    # bnb keeps a 16-entry (and, nested, a 256-entry) fp32 code table per layer: large for tiny layers
    assert report["code_tables"] == 14 * (64 + (1024 if double_quant else 0))
    print(f"\ntiny llama nf4 double_quant={double_quant}: {report}")


# -- fused CPU layout, requantization ------------------------------------------------------------
def test_default_keeps_the_standard_layout_in_eval():
    layer = quantized_linear(normal(64, 128, seed=7), compute_dtype="bf16")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.quant_state.nested


def test_dequantize_reads_the_fused_cpu_layout():
    layer = quantized_linear(normal(64, 128, seed=8) * 0.05, bias=False, compute_dtype="bf16", cpu_fused_inference=True)
    before = dequantize_weight(layer)
    layer.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        out = layer(x)
    repacked = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert repacked == cpu_supports_bf16()  # bitsandbytes repacks only where it has the AVX-512 BF16 kernel
    after = dequantize_weight(layer)
    # the fused layout keeps absmax in bf16: within bf16 rounding of the original
    assert ((after - before).norm() / before.norm()) < 4e-3
    expected = x @ after.T
    assert ((out - expected).norm() / expected.norm()) < 1e-2


def test_bad_options_name_the_field_and_the_allowed_values():
    cases = {
        "compute_dtype": ("fp16", r"compute_dtype\n.*'auto', 'bf16' or 'fp32'"),
        "blocksize": (100, r"blocksize\n.*32, 64, 128, 256, 512, 1024, 2048 or 4096"),
        "targets": ("all", r"targets\.literal\['all-linear','attention','mlp'\]"),
        "double_quant": ("maybe", r"double_quant\n.*valid boolean"),
    }
    for field, (value, pattern) in cases.items():
        with pytest.raises(ValidationError, match=pattern):
            NF4Config(**{field: value})
    with pytest.raises(ValidationError, match="bits\n.*Extra inputs are not permitted"):
        NF4Config(bits=4)
    with pytest.raises(ValidationError, match="paged_optimizer.*CUDA-only"):
        NF4Config(paged_optimizer=True)
    with pytest.raises(ValidationError, match="cpu_fused_inference needs double_quant"):
        NF4Config(cpu_fused_inference=True, double_quant=False)
    with pytest.raises(ValidationError, match="targets is empty"):
        NF4Config(targets=[])
    with pytest.raises(ValidationError, match="bad regular expression"):
        NF4Config(skip=["re:("])


def test_core_reports_bad_options_by_plugin_and_field():
    manager = PluginManager()
    manager.register_module(deltatune_nf4, distribution="deltatune-nf4")
    expected = r"quantizer 'nf4'(.|\n)*compute_dtype: Input should be 'auto', 'bf16' or 'fp32'"
    with pytest.raises(ConfigError, match=expected):
        resolve("quantizer", {"name": "nf4", "config": {"compute_dtype": "int8"}}, manager)
    resolved = resolve("quantizer", {"name": "nf4", "config": {"double_quant": False}}, manager)
    assert isinstance(resolved.plugin, NF4) and resolved.cfg.double_quant is False


@pytest.mark.parametrize("double_quant", [True, False])
def test_requantize_after_merge(double_quant):
    weight = normal(64, 128, seed=9) * 0.05
    layer = quantized_linear(weight, double_quant=double_quant, compute_dtype="fp32")
    dense = dequantize_weight(layer)

    again = NF4().requantize(dense, like=layer)
    assert torch.equal(again.weight.data, layer.weight.data)  # an NF4 weight requantizes to its own codes
    if double_quant:  # absmax goes through 8 bits again, around a new mean
        assert torch.allclose(dequantize_weight(again), dense, atol=1e-4)
    else:
        assert torch.equal(dequantize_weight(again), dense)

    merged = dense + 1e-3 * normal(64, 128, seed=10)  # a small merged "delta"
    new = NF4().requantize(merged, like=layer)
    assert new.bias is layer.bias and new.compute_dtype == layer.compute_dtype
    assert new.weight.blocksize == 64 and new.weight.quant_state.nested is double_quant
    error = NF4().quantization_error(merged, new)
    assert 0 < error["relative"] < 0.1
    x = torch.randn(2, 128)
    assert torch.allclose(new(x), x @ dequantize_weight(new).T + new.bias, atol=1e-5)
    assert requantize(merged, layer, bias=None).bias is None


# -- plugin contract ------------------------------------------------------------------------------
def test_registers_through_the_hook_and_follows_the_protocol():
    manager = PluginManager()
    manager.register_module(deltatune_nf4, distribution="deltatune-nf4")
    assert not manager.failures
    info = manager.get("quantizer", "nf4")
    assert info.cls is NF4 and info.distribution == "deltatune-nf4"
    assert isinstance(NF4(), Quantizer)
    assert NF4.Config is NF4Config and NF4Config.model_config["extra"] == "forbid"


def test_installed_entry_point():
    from importlib.metadata import entry_points

    (entry,) = [ep for ep in entry_points(group="deltatune") if ep.name == "nf4"]
    assert entry.value == "deltatune_nf4" and entry.load() is deltatune_nf4
