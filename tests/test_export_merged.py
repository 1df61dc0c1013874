"""Merged export (core/deltatune/export.py ``export_merged``): every delta folded into the base, a
quantized base dequantized (or requantized), written as a plain Hugging Face folder that
``transformers`` alone loads, with a measured logit report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltatune.adapter import load_adapter, save_adapter
from deltatune.export import PROMPTS, export_merged, model_logits, prompt_batch
from deltatune.models import tiny_llama, tiny_tokenizer
from deltatune.pipeline import ModelSpec, build_model, resolve_spec

LORA_ATTN = {"name": "lora", "config": {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
DORA_MLP = {"name": "dora", "config": {"r": 4, "alpha": 8, "targets": ["gate_proj", "up_proj", "down_proj"]}}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def biased_base(tmp_path_factory) -> str:
    """A Hugging Face folder holding a tiny Llama with attention and MLP biases (and a tokenizer)."""
    folder = tmp_path_factory.mktemp("biased-base")
    tiny_llama(attention_bias=True, mlp_bias=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def trained_adapter(folder: Path, delta: list, base: str = "tiny-llama", quantizer: dict | None = None):
    """Build, perturb every trainable tensor (a trained-like state: B is non-zero, the update is a
    fair fraction of the base weights, whose entries are about 0.02) and save."""
    resolved = resolve_spec(ModelSpec(base=base, delta=delta, quantizer=quantizer, base_dtype="fp32"))
    torch.manual_seed(0)  # the methods' own initialisation (LoRA's A) draws from the global generator
    model = build_model(resolved)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * (0.1 if param.ndim == 1 else 0.03))
    model.eval()
    save_adapter(model, resolved, folder)
    return model, resolved


def ids() -> torch.Tensor:
    return torch.randint(0, 250, (2, 23), generator=torch.Generator().manual_seed(0))


MERGED_CASES = {
    "lora": ([{"name": "lora", "config": {"r": 4, "alpha": 4, "targets": "all-linear", "rslora": True}}], False),
    "dora": ([DORA_MLP], False),
    "vera": ([{"name": "vera", "config": {"r": 8, "targets": ["q_proj", "down_proj"]}}], False),
    "bitfit-added": (["bitfit"], False),
    "dora+lora+bitfit": ([DORA_MLP, LORA_ATTN, "bitfit"], True),
}


@pytest.mark.parametrize("case", list(MERGED_CASES))
def test_merged_export_is_a_plain_transformers_model_with_the_adapter_logits(tmp_path, biased_base, case) -> None:
    delta, biased = MERGED_CASES[case]
    model, _ = trained_adapter(tmp_path / "adapter", delta, biased_base if biased else "tiny-llama")
    report = export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert report.max_abs_logit_diff <= 1e-5 * report.max_abs_logit
    assert "largest |logit difference| vs the adapter model" in str(report)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # transformers alone
    assert not any(".deltas." in k or "base_layer" in k for k in load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert rel(merged(input_ids=ids()).logits, model(input_ids=ids()).logits) <= 1e-5
    if case == "bitfit-added":
        assert report.bias_flags == ["attention_bias", "mlp_bias"]
        assert merged.config.attention_bias and merged.config.mlp_bias


def test_merged_report_is_measured_not_assumed(tmp_path) -> None:
    """bf16 weights change the logits; the report's number is the one we measure ourselves."""
    trained_adapter(tmp_path / "adapter", [DORA_MLP])
    report = export_merged(tmp_path / "adapter", tmp_path / "merged", dtype="bf16")
    adapter, _ = load_adapter(tmp_path / "adapter")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    batch = prompt_batch(tiny_tokenizer(), PROMPTS)
    measured = max(float((a - b).abs().max()) for a, b in zip(model_logits(adapter, batch), model_logits(written, batch)))
    assert report.max_abs_logit_diff > 1e-4
    assert report.max_abs_logit_diff == pytest.approx(measured, rel=1e-3)
    assert next(written.parameters()).dtype == torch.bfloat16


NF4 = {"name": "nf4", "config": {"compute_dtype": "fp32"}}


def test_merged_export_from_an_nf4_base_dequantizes_every_layer(tmp_path) -> None:
    trained_adapter(tmp_path / "adapter", [LORA_ATTN], quantizer=NF4)
    report = export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert report.dequantized_layers == 2 * 3  # the MLP layers had no delta to merge
    assert report.max_abs_logit_diff <= 1e-4 * report.max_abs_logit
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {type(m).__name__ for m in merged.modules()} >= {"Linear"}
    assert "Linear4bit" not in {type(m).__name__ for m in merged.modules()}


def test_merged_export_can_requantize_to_nf4(tmp_path) -> None:
    trained_adapter(tmp_path / "adapter", [DORA_MLP], quantizer=NF4)
    report = export_merged(tmp_path / "adapter", tmp_path / "merged", requantize=True)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    # re-rounding the merged weights to 4 bits costs accuracy, and the report says how much
    assert report.requantized and 0 < report.max_abs_logit_diff < 0.5 * report.max_abs_logit
