"""Merged export (core/deltatune/export.py ``export_merged``): every delta folded into the base, a
quantized base dequantized (or requantized), written as a plain Hugging Face folder that
``transformers`` alone loads, with a measured logit report."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapter_cases import DORA_MLP, LORA_ATTN, ids, trained_adapter
from deltatune.io.adapter import load_adapter
from deltatune.io.merged import PROMPTS, export_merged, model_logits, prompt_batch
from deltatune.model.loading import tiny_tokenizer
from deltatune.testing import max_relative_difference as rel

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
