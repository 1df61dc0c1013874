"""GGUF export: the adapter merged into its base, written as one GGUF file for llama.cpp and Ollama.

:func:`export_gguf` builds the merged model the merged export builds (every delta folded in, a
quantized base dequantized, wrappers removed), then writes it with the ``gguf`` package's
:class:`gguf.GGUFWriter`: tensor names from its :class:`gguf.TensorNameMap` for the architecture,
hyperparameters under its ``Keys``, the tokenizer (tokens, token types, merges, special token ids,
whether BOS/EOS are added) and the chat template. Tensor types are the ones the ``gguf`` package
itself quantizes (:data:`GGUF_TYPES`); vectors (norms, biases) stay f32 and a matrix whose rows do not
split into whole quantization blocks is written f16, as llama.cpp's converter does.

llama.cpp's ``llama`` graph rotates adjacent pairs of the query and key features, Hugging Face's Llama
the two halves, so the query and key rows are permuted for that architecture (as llama.cpp's
converter does and ``transformers``' GGUF loader undoes); ``qwen2`` uses the halves as they are.

After writing, the file is read back by ``transformers``' GGUF loader: the report gives the largest
logit difference against the adapter model on a few prompts and whether the embedded tokenizer gives
the same token ids as the adapter's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.io.adapter import load_for_export
from deltatune.io.atomic import atomic_file
from deltatune.io.merged import PROMPTS, enable_bias_flags, merge_into_base, model_logits, prompt_batch
from deltatune.plugin.manager import PluginManager

GGUF_TYPES = ("f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""Tensor types deltatune writes: those the ``gguf`` package quantizes itself (no K-quants)."""
LOW_BIT = {"Q5_1", "Q5_0", "Q4_1", "Q4_0"}
"""Types whose output matrix (or tied embedding) is written q8_0 instead (:func:`add_tensors`)."""
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
"""Hugging Face ``model_type`` → the ``gguf.MODEL_ARCH`` member it is written as (llama.cpp runs
Mistral as ``llama``)."""
HALVES_ROPE = {"QWEN2"}
"""Architectures whose llama.cpp graph rotates query/key halves as Hugging Face does (no permutation)."""
PRE_TOKENIZERS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
"""llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) of the split regexes they apply before
byte-level BPE; a plain GPT-2 byte-level pre-tokenizer is ``gpt-2``."""
MARK = "deltatune.adapter"
"""GGUF key naming the adapter a file was exported from: a file with it may be replaced."""


def gguf_type(name: str) -> Any:
    """The ``gguf.GGMLQuantizationType`` for type ``name`` (one-line error listing the supported ones)."""
    from gguf import GGMLQuantizationType

    if name.lower() not in GGUF_TYPES:
        raise ConfigError(
            f"GGUF type {name!r} is not supported; deltatune writes {', '.join(GGUF_TYPES)} "
            "(the types the gguf package quantizes)"
        )
    return GGMLQuantizationType[name.upper()]


def file_type(qtype: Any) -> Any:
    """``general.file_type`` for a file whose matrices are ``qtype``."""
    from gguf import LlamaFileType

    return LlamaFileType.ALL_F32 if qtype.name == "F32" else LlamaFileType[f"MOSTLY_{qtype.name}"]


def architecture(config: Any) -> Any:
    """The ``gguf.MODEL_ARCH`` for a Hugging Face config, or a :class:`ConfigError` naming what a
    GGUF reader could not rebuild (unsupported family, rope scaling, biases a Llama file cannot flag)."""
    from gguf import MODEL_ARCH

    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: {model_type} with rope scaling {rope.get('rope_type')!r} is not supported")
    arch = MODEL_ARCH[ARCHITECTURES[model_type]]
    if arch.name == "LLAMA":
        flags = [k for k, v in config.to_dict().items() if k.endswith("bias") and v is True]
        if flags:
            raise ConfigError(
                f"GGUF export: the merged {model_type} model has biases ({', '.join(flags)}) that a GGUF llama "
                "file cannot declare and readers drop; use `deltatune export --format merged`"
            )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch.name in HALVES_ROPE and head_dim != config.hidden_size // config.num_attention_heads:
        raise ConfigError(f"GGUF export: {model_type} with head_dim {head_dim} != hidden_size / heads is not supported")
    if getattr(config, "use_sliding_window", False):
        raise ConfigError(f"GGUF export: {model_type} with use_sliding_window is not supported")
    return arch


def _pre_tokenizer(tokenizer: Any) -> str:
    """``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, or a :class:`ConfigError`."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = backend["model"], backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or model.get("byte_fallback") or steps[-1].get("type") != "ByteLevel":
        raise ConfigError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style), not {type(tokenizer).__name__} with a "
            f"{model.get('type')} model and pre-tokenizer {[s.get('type') for s in steps]}"
        )
    if steps[-1].get("add_prefix_space"):
        raise ConfigError("GGUF export: a byte-level tokenizer that adds a prefix space is not supported")
    if len(steps) == 1 and steps[0].get("use_regex", True):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Split" and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name, known in PRE_TOKENIZERS.items():
            if regex == known:
                return name
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and steps[1].get("use_regex", True):
        return "smollm"
    raise ConfigError(f"GGUF export: the tokenizer's pre-tokenization {steps} is not one llama.cpp knows by name")


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Write the tokenizer's vocabulary (padded to the embedding's ``vocab_size`` rows with unused
    tokens), token types, merges, special token ids, BOS/EOS flags and chat template."""
    from gguf import TokenType

    pre = _pre_tokenizer(tokenizer)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has token ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    added = {index: token.special for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        if index not in by_id:
            types.append(TokenType.UNUSED)
        elif index in added:
            types.append(TokenType.CONTROL if added[index] else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(len(framed) > len(plain) and framed[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(framed) > len(plain) and framed[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def add_hyperparameters(writer: Any, config: Any) -> None:
    """Write the architecture's hyperparameters from a Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def interleave_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Query/key rows reordered from Hugging Face's rotate-halves layout to llama.cpp's adjacent pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def add_tensors(writer: Any, model: nn.Module, arch: Any, qtype: Any) -> list[str]:
    """Write ``model``'s weights under their GGUF names; vectors as f32, matrices as ``qtype``, but
    the output matrix (the embedding when it is tied) as q8_0 for the 4- and 5-bit types, which
    llama.cpp's quantizer likewise keeps at a higher precision.

    Returns the GGUF names of the matrices written f16 because their rows do not split into whole
    blocks.
    """
    from gguf import GGMLQuantizationType, QuantError, get_tensor_name_map, quants

    config = model.config
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    fallbacks = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: tensor {hf_name} has no GGUF name in the {arch.name.lower()} tensor map")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if arch.name not in HALVES_ROPE and data.ndim == 2 and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = interleave_rope(data, heads if name.endswith("attn_q.weight") else kv_heads)
        output = name == "output.weight" or (name == "token_embd.weight" and config.tie_word_embeddings)
        kind = GGMLQuantizationType.Q8_0 if output and qtype.name in LOW_BIT else qtype
        if data.ndim == 1 or kind == GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif kind == GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            try:
                writer.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)
            except QuantError:
                fallbacks.append(name)
                writer.add_tensor(name, data.astype(np.float16))
    return fallbacks


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, qtype: Any, *, name: str, source: str) -> list[str]:
    """Write the plain ``transformers`` ``model`` and its ``tokenizer`` as a GGUF file at ``path``
    (``source`` goes under :data:`MARK`); returns the matrices written f16 instead of ``qtype``."""
    from gguf import GGML_QUANT_VERSION, MODEL_ARCH_NAMES, GGUFWriter

    arch = architecture(model.config)
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_string(MARK, source)
    add_hyperparameters(writer, model.config)
    writer.add_file_type(file_type(qtype))
    if qtype.name not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    fallbacks = add_tensors(writer, model, arch, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return fallbacks


def written_by_deltatune(path: Path) -> bool:
    """Whether ``path`` is a GGUF file deltatune exported (it carries :data:`MARK`)."""
    from gguf import GGUFReader

    try:
        return MARK in GGUFReader(path).fields
    except Exception:  # not a GGUF file at all: not ours
        return False


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is not a ``.gguf`` path or is a folder; an existing file only with
    ``overwrite``, and never one deltatune did not write."""
    if out.suffix != ".gguf":
        raise ConfigError(f"GGUF export: --out {out} must be a file name ending in .gguf")
    if out.is_dir():
        raise ConfigError(f"GGUF export: --out {out} is a folder; give the .gguf file to write")
    if out.exists() and not written_by_deltatune(out):
        raise ConfigError(f"GGUF export: --out {out} exists and deltatune did not write it; choose another file")
    if out.exists() and not overwrite:
        raise ConfigError(f"GGUF export: --out {out} is an earlier export; pass --overwrite to replace it")


@dataclass
class GgufExport:
    """What :func:`export_gguf` wrote and how closely the file, read back by ``transformers``,
    matches the adapter model."""

    out: Path
    type: str
    methods: list[str]
    max_abs_logit_diff: float | None
    """``None`` (and so the next four fields) when the file was not read back (``verify=False``)."""
    max_abs_logit: float | None
    prompts: int | None
    tokens: int | None
    same_token_ids: bool | None
    dequantized_layers: int = 0
    f16_fallbacks: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        methods = " + ".join(self.methods) or "full fine-tune"
        lines = [f"GGUF ({self.type}) of the merged model ({methods}) written to {self.out}"]
        if self.max_abs_logit_diff is None:
            lines.append("not read back (verification skipped)")
        else:
            lines += [
                f"read back by transformers: largest |logit difference| vs the adapter model {self.max_abs_logit_diff:.3g} "
                f"(logits up to {self.max_abs_logit:.3g}; {self.prompts} prompts, {self.tokens} tokens)",
                "embedded tokenizer: " + ("same token ids as the adapter's" if self.same_token_ids else
                                          "DIFFERENT token ids from the adapter's tokenizer"),
            ]
        if self.dequantized_layers:
            lines.append(f"dequantized {self.dequantized_layers} quantized layers")
        if self.f16_fallbacks:
            lines.append(f"{len(self.f16_fallbacks)} matrices written f16 (rows not a whole number of {self.type} blocks)")
        return "\n".join(lines)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` read from a GGUF file by ``transformers``' GGUF loader (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def export_gguf(
    adapter_dir: str | Path, out: str | Path, *, type: str = "f16", overwrite: bool = False,
    prompts: tuple[str, ...] | list[str] = PROMPTS, manager: PluginManager | None = None,
    trust_remote_code: bool = False, verify: bool = True,
) -> GgufExport:
    """Write the adapter at ``adapter_dir`` merged into its base as the GGUF file ``out``.

    ``type`` is the tensor type of the matrices (:data:`GGUF_TYPES`). An existing ``out`` is replaced
    only if deltatune wrote it or ``overwrite`` is set; the file appears complete or not at all.
    ``trust_remote_code``: the user allows the base model's own code (needed when the adapter says so).
    ``verify``: read the written file back with ``transformers`` (the whole model, dequantized) and
    compare its logits on ``prompts`` and its tokenizer's ids with the adapter model's; without it the
    report's comparison fields are ``None``.
    """
    from deltatune.model.loading import load_tokenizer

    qtype = gguf_type(type)
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_target(out, overwrite)
    model, resolved = load_for_export(adapter_dir, manager, trust_remote_code)
    architecture(model.config)
    tokenizer = load_tokenizer(resolved.spec.base, trust_remote_code)
    batch = prompt_batch(tokenizer, prompts) if verify else []
    reference = model_logits(model, batch) if verify else []
    dequantized = merge_into_base(model, resolved)
    enable_bias_flags(model)
    with atomic_file(out) as tmp:
        fallbacks = write_gguf(model, tokenizer, tmp, qtype, name=adapter_dir.name, source=str(adapter_dir))
    del model
    methods = [d.name for d in resolved.deltas]
    if not verify:
        return GgufExport(out=out, type=type.lower(), methods=methods, max_abs_logit_diff=None, max_abs_logit=None,
                          prompts=None, tokens=None, same_token_ids=None, dequantized_layers=dequantized,
                          f16_fallbacks=fallbacks)
    written, written_tokenizer = load_gguf(out)
    same_ids = all(
        written_tokenizer(p, add_special_tokens=False)["input_ids"] == ids[0].tolist() for p, ids in zip(prompts, batch)
    )
    merged = model_logits(written, batch)
    return GgufExport(
        out=out,
        type=type.lower(),
        methods=methods,
        max_abs_logit_diff=max(float((a - b).abs().max()) for a, b in zip(reference, merged)),
        max_abs_logit=max(float(a.abs().max()) for a in reference),
        prompts=len(batch),
        tokens=sum(int(ids.shape[1]) for ids in batch),
        same_token_ids=same_ids,
        dequantized_layers=dequantized,
        f16_fallbacks=fallbacks,
    )
