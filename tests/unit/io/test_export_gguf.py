"""GGUF export (core/deltatune/io/gguf.py ``export_gguf``): the merged model written with the ``gguf``
package's writer, read back by ``transformers``' GGUF loader and by deltatune's own GGUF base loading
with the adapter model's logits (within each tensor type's tolerance), and with the embedded
tokenizer giving the adapter tokenizer's ids. Tiny random Llama, Mistral and Qwen2 models carry the
real SmolLM2 tokenizer (49152 tokens, merges, special tokens, chat template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from adapter_cases import DORA_MLP, LORA_ATTN, trained_adapter
from deltatune.cli.main import main
from deltatune.errors import ConfigError
from deltatune.io.merged import export_merged
from deltatune.io.gguf import GGUF_TYPES, MARK, export_gguf
from deltatune.model.loading import load_base, load_tokenizer

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q5_1": 0.2, "q4_0": 0.35}
"""Largest |logit difference| against the adapter model, relative to its largest |logit|, per tensor
type. The random tiny models are a worst case for rounding (their logits are small, about 0.8, and
their weights carry no structure); the exact check is against the rounded merged model."""
TEXTS = [
    "Hello world, 1234 apples!",
    "  leading spaces\tand\nnewlines",
    "Ünïcödé — 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
]
"""Samples for the tokenizer round trip: digits, whitespace, non-ASCII, special tokens."""


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, smollm2_tokenizer):
    """``family -> folder`` of a tiny random model of that family with the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("gguf-bases")
    folders = {}
    for family, (config_class, model_class) in FAMILIES.items():
        config = config_class(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=family == "qwen2", pad_token_id=None)
        torch.manual_seed(0)
        model_class(config).save_pretrained(root / family)
        smollm2_tokenizer.save_pretrained(root / family)
        folders[family] = str(root / family)
    return folders


def ids_of(tokenizer) -> torch.Tensor:
    """The chat-templated sample texts as one row of token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": " ".join(TEXTS)}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def tensor_type(path: Path, name: str) -> str:
    return next(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name == name)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family,type", [  # a float, a bf16 and three block types; every family at least once
    ("qwen2", "f16"), ("llama", "bf16"), ("qwen2", "q8_0"), ("mistral", "q5_1"), ("llama", "q4_0"),
])
def test_gguf_round_trips_through_the_transformers_gguf_loader(tmp_path, bases, smollm2_tokenizer, family, type):
    model, _ = trained_adapter(tmp_path / "adapter", [LORA_ATTN], base=bases[family])
    out = tmp_path / "model.gguf"
    verify = type == "q8_0"  # export's own read-back check (it reads what this test reads) once
    report = export_gguf(tmp_path / "adapter", out, type=type, verify=verify)
    ids = ids_of(smollm2_tokenizer)
    written = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    rounded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    qtype = gguf.GGMLQuantizationType[type.upper()]
    with torch.no_grad():
        logits, reference = written(input_ids=ids).logits, model(input_ids=ids).logits
        for param in rounded.parameters():  # the merged model with its matrices rounded as the file holds them
            output = param is rounded.get_output_embeddings().weight  # the tied embedding too
            kind = gguf.GGMLQuantizationType.Q8_0 if output and type in ("q5_1", "q4_0") else qtype
            if param.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), kind), kind)))
        exact = rounded(input_ids=ids).logits
    assert relative(logits, exact) <= 1e-5, "the file holds other weights than the rounded merged model's"
    error = relative(logits, reference)
    assert error <= TOLERANCE[type], f"{family} {type}: relative logit error {error:.3g}"
    if verify:
        assert report.max_abs_logit_diff <= TOLERANCE[type] * report.max_abs_logit and report.same_token_ids
    else:
        assert report.max_abs_logit_diff is None and report.same_token_ids is None
    if type != "f32":  # rounding is lossy: the exact check above is not vacuous
        assert error > 1e-5
    assert tensor_type(out, "blk.0.attn_q.weight") == type.upper()
    assert tensor_type(out, "blk.0.attn_norm.weight") == "F32"
    output = "token_embd.weight" if family == "qwen2" else "output.weight"  # qwen2's is tied
    assert tensor_type(out, output) == ("Q8_0" if type in ("q5_1", "q4_0") else type.upper())
    assert written.config.model_type == ("qwen2" if family == "qwen2" else "llama")
    assert written.config.tie_word_embeddings == (family == "qwen2")


def test_the_embedded_tokenizer_and_chat_template_round_trip(tmp_path, bases, smollm2_tokenizer):
    trained_adapter(tmp_path / "adapter", [LORA_ATTN], base=bases["llama"])
    export_gguf(tmp_path / "adapter", tmp_path / "model.gguf", verify=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"], text
    assert tokenizer.decode(smollm2_tokenizer(TEXTS[2])["input_ids"]) == TEXTS[2]
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id)
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    merges = json.loads(smollm2_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in merges]
    types = fields["tokenizer.ggml.token_type"].contents()
    control = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    assert control == sorted(i for i, t in smollm2_tokenizer.added_tokens_decoder.items() if t.special)


def test_deltatune_loads_the_exported_gguf_as_a_base(tmp_path, bases, smollm2_tokenizer, monkeypatch):
    """``load_base('x.gguf')`` converts through deltatune's own GGUF path (the way the embedded model
    is read) and gives the merged model's logits and the adapter's token ids."""
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path / "home"))
    model, _ = trained_adapter(tmp_path / "adapter", [DORA_MLP, LORA_ATTN], base=bases["llama"])
    export_gguf(tmp_path / "adapter", tmp_path / "model.gguf", type="f32", verify=False)
    base, tokenizer = load_base(str(tmp_path / "model.gguf"))
    ids = ids_of(smollm2_tokenizer)
    assert ids_of(tokenizer).tolist() == ids.tolist()
    with torch.no_grad():
        assert relative(base.eval()(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-5
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "model.gguf", tmp_path / "elsewhere" / "model.gguf")  # another path and mtime
    load_base(str(tmp_path / "elsewhere" / "model.gguf"))
    assert len(list((tmp_path / "home" / "models").iterdir())) == 1  # the same content: one conversion


@pytest.mark.parametrize("delta,family", [
    ([{"name": "vera", "config": {"r": 8, "targets": ["q_proj", "down_proj"]}}], "llama"),
    (["bitfit"], "qwen2"),  # trains Qwen2's own q/k/v biases
    ([], "llama"),  # a full fine-tune
])
def test_every_kind_of_adapter_exports(tmp_path, bases, smollm2_tokenizer, delta, family):
    trained_adapter(tmp_path / "adapter", delta, base=bases[family])
    if not delta:  # a fit saves the tokenizer beside a full fine-tune's weights
        smollm2_tokenizer.save_pretrained(tmp_path / "adapter" / "model")
    report = export_gguf(tmp_path / "adapter", tmp_path / "model.gguf", type="f32")
    assert report.max_abs_logit_diff <= 1e-5 * report.max_abs_logit
    assert report.same_token_ids


def test_biases_a_gguf_llama_file_cannot_declare_are_refused(tmp_path, bases):
    trained_adapter(tmp_path / "adapter", ["bitfit"], base=bases["llama"])  # adds biases to a bias-free Llama
    with pytest.raises(ConfigError, match="attention_bias, mlp_bias.*--format merged"):
        export_gguf(tmp_path / "adapter", tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*model.gguf*"))


def test_an_unsupported_family_is_refused_naming_it(tmp_path, bases):
    trained_adapter(tmp_path / "adapter", [{"name": "lora", "config": {"targets": ["o_proj"]}}], base=bases["phi3"])
    with pytest.raises(ConfigError, match="model_type 'phi3'; supported: llama, mistral, qwen2"):
        export_gguf(tmp_path / "adapter", tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*model.gguf*"))


def test_the_supported_types_are_the_ones_the_gguf_package_quantizes() -> None:
    rows = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for name in GGUF_TYPES:
        quantized = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[name.upper()])
        restored = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType[name.upper()])
        assert np.abs(restored - rows).max() < 0.3
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q4_K)
    with pytest.raises(ConfigError, match=r"GGUF type 'q4_k_m' is not supported; deltatune writes f16, bf16, f32, q8_0"):
        export_gguf("unused", "unused.gguf", type="q4_k_m")


def test_a_file_deltatune_did_not_write_is_never_replaced(tmp_path, bases, capsys):
    trained_adapter(tmp_path / "adapter", [LORA_ATTN], base=bases["llama"])
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"someone else's model")
    export = ["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf"]
    for overwrite in ([], ["--overwrite"]):
        assert main([*export, "--out", str(foreign), *overwrite]) == 1
        assert "exists and deltatune did not write it" in capsys.readouterr().err
    assert foreign.read_bytes() == b"someone else's model"
    out = tmp_path / "ours.gguf"
    assert main([*export, "--out", str(out), "--gguf_type", "q8_0"]) == 0
    assert "GGUF (q8_0)" in capsys.readouterr().out
    assert MARK in gguf.GGUFReader(out).fields
    assert main([*export, "--out", str(out)]) == 1  # an earlier export is replaced only when asked
    assert "is an earlier export; pass --overwrite" in capsys.readouterr().err
    assert main([*export, "--out", str(out), "--overwrite", "--no_verify"]) == 0
    assert "not read back" in capsys.readouterr().out
    assert tensor_type(out, "blk.0.attn_q.weight") == "F16"
    assert main([*export, "--out", str(out), "--gguf_type", "q4_k_m"]) == 1
    assert "deltatune writes f16, bf16" in capsys.readouterr().err


def test_llama_cpp_runs_the_exported_file_with_the_merged_logits(tmp_path, bases, smollm2_tokenizer):
    """Optional extra: llama.cpp itself (``llama-cpp-python``, an sdist that compiles llama.cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional: pip install llama-cpp-python)")
    model, _ = trained_adapter(tmp_path / "adapter", [LORA_ATTN], base=bases["llama"])
    export_gguf(tmp_path / "adapter", tmp_path / "model.gguf", type="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    ids = ids_of(smollm2_tokenizer)
    text = smollm2_tokenizer.decode(ids[0])
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids[0].tolist()
    llm.eval(ids[0].tolist())
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
    # llama.cpp keeps its KV cache in f16, so its f32 model is close but not exact
    assert relative(torch.from_numpy(np.array(llm.scores[: ids.shape[1]])), reference) <= 1e-3
