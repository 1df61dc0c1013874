"""Merged export: the adapter folded into its base as a plain Hugging Face folder.

:func:`export_merged` folds every delta into the base weights, dequantizes a quantized base, removes
the wrappers and writes a Hugging Face folder (safetensors, config, tokenizer) that ``transformers``
alone loads; biases a delta method added switch on the architecture's ``*_bias`` config flags (zero
biases elsewhere). With ``requantize`` the merged weights are quantized again in the format of the
adapter's quantizer, as that quantizer describes it to ``transformers``
(``transformers_quantization_config``, an optional member of
:class:`~deltatune.plugin.protocols.Quantizer`). It
then reloads the folder with ``transformers`` and reports the largest absolute logit difference
against the adapter model on a few prompts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deltatune.deltas.experts import DeltaExperts
from deltatune.deltas.layer import dense_copy, get_submodule_parent, is_quantized, unwrap
from deltatune.errors import ConfigError
from deltatune.io.adapter import load_for_export
from deltatune.io.atomic import atomic_folder, check_target
from deltatune.model.assembly import ResolvedSpec, compute_context
from deltatune.plugin.manager import PluginManager

PROMPTS = (
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Translate 'good morning' into French.",
    "List three prime numbers.",
)


@dataclass
class MergedExport:
    """What :func:`export_merged` wrote and how closely the written model matches the adapter."""

    out: Path
    dtype: str
    methods: list[str]
    max_abs_logit_diff: float
    max_abs_logit: float
    prompts: int
    tokens: int
    dequantized_layers: int = 0
    bias_flags: list[str] = field(default_factory=list)
    requantized: bool = False
    quantizer: str | None = None
    """The adapter's quantizer (the format of the weights when :attr:`requantized`)."""

    def __str__(self) -> str:
        methods = " + ".join(self.methods) or "full fine-tune"
        lines = [
            f"merged model ({methods}) written to {self.out} "
            f"({self.dtype}{f', requantized with {self.quantizer}' if self.requantized else ''})",
            f"largest |logit difference| vs the adapter model: {self.max_abs_logit_diff:.3g} "
            f"(logits up to {self.max_abs_logit:.3g}; {self.prompts} prompts, {self.tokens} tokens)",
        ]
        if self.dequantized_layers:
            lines.append(f"dequantized {self.dequantized_layers} quantized layers")
        if self.bias_flags:
            lines.append(f"config flags switched on for added biases: {', '.join(self.bias_flags)}")
        return "\n".join(lines)


def prompt_batch(tokenizer: Any, prompts: tuple[str, ...] | list[str] = PROMPTS) -> list[torch.Tensor]:
    """Token ids (one ``1 x n`` tensor per prompt, no padding) for logit comparisons."""
    return [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in prompts]


@torch.no_grad()
def model_logits(model: nn.Module, batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits of ``model`` for each prompt of ``batch``."""
    device = next(model.parameters()).device
    with compute_context(model):
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batch]


def merge_into_base(model: nn.Module, resolved: ResolvedSpec) -> int:
    """Merge every delta, dequantize what is still quantized and unwrap; returns how many layers
    were dequantized. ``model`` is then a plain ``transformers`` model."""
    for delta in resolved.deltas:
        delta.plugin.merge(model)
    unwrap(model)
    dequantized = sum(experts.dequantize() for experts in model.modules() if isinstance(experts, DeltaExperts))
    unwrap(model, DeltaExperts)  # quantized expert parameters are dense again: they count as layers here
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, dense_copy(module))
            dequantized += 1
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return dequantized


def enable_bias_flags(model: nn.Module) -> list[str]:
    """Switch on the config's ``*_bias`` flags the model's biases need (biases a delta method added), and
    give zero biases to the layers those flags add; returns the flags switched on.

    Raises :class:`ConfigError` when the architecture has no flag that makes its layers carry the
    biases the model has.
    """
    from transformers import AutoModelForCausalLM

    def keys(config: Any) -> set[str]:
        with torch.device("meta"):
            return set(AutoModelForCausalLM.from_config(config).state_dict())

    ours = set(model.state_dict())
    extra = ours - keys(model.config)
    if not extra:
        return []
    config = model.config.__class__.from_dict(model.config.to_dict())
    flags = []
    for flag, value in model.config.to_dict().items():
        if flag.endswith("bias") and value is False:
            setattr(config, flag, True)
            if keys(config) & extra:
                flags.append(flag)
            else:
                setattr(config, flag, False)
    expected = keys(config)
    if extra - expected:
        raise ConfigError(
            f"the merged model has biases that {type(model).__name__} cannot hold, e.g. {sorted(extra - expected)[:3]}; "
            "keep the deltatune adapter, or target layers whose biases the architecture has"
        )
    for key in sorted(expected - ours):
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        if attr != "bias" or not isinstance(module, nn.Linear):
            raise ConfigError(f"cannot switch on {flags}: it would add {key}, which is not a linear bias")
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype), requires_grad=False)
    for flag in flags:
        setattr(model.config, flag, True)
    return flags


def quantization_config(resolved: ResolvedSpec) -> Any:
    """The ``transformers`` quantization config that re-quantizes merged weights in the format of the
    adapter's quantizer; a :class:`ConfigError` when there is none or it cannot describe itself."""
    if resolved.quantizer is None:
        raise ConfigError("requantize: the adapter was trained on a dense base, so there is no quantizer "
                          "to quantize the merged weights with; export without requantize")
    describe = resolved.quantizer.optional("transformers_quantization_config")
    if describe is None:
        raise ConfigError(f"requantize: quantizer '{resolved.quantizer.name}' declares no "
                          "transformers_quantization_config(cfg); export without requantize")
    return describe(resolved.quantizer.cfg)


def export_merged(
    adapter_dir: str | Path, out: str | Path, *, dtype: Literal["fp32", "bf16"] = "fp32", requantize: bool = False,
    prompts: tuple[str, ...] | list[str] = PROMPTS, manager: PluginManager | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> MergedExport:
    """Write the adapter at ``adapter_dir`` merged into its base as a Hugging Face folder ``out``.

    ``dtype`` is the dtype of the written weights. ``requantize`` writes the weights quantized in the
    format of the adapter's quantizer instead (:func:`quantization_config`). The returned report holds the largest absolute
    logit difference between the adapter model and the written model reloaded by ``transformers``.
    ``trust_remote_code``: the user allows the base model's own code (needed when the adapter says so).
    An existing ``out`` is replaced only as :func:`~deltatune.io.peft.export_peft` replaces one.
    """
    from transformers import AutoModelForCausalLM

    from deltatune.model.loading import load_tokenizer

    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype must be 'fp32' or 'bf16', not {dtype!r}")
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_target(out, overwrite=overwrite, protected=[adapter_dir])
    model, resolved = load_for_export(adapter_dir, manager, trust_remote_code)
    requantized_as = quantization_config(resolved) if requantize else None
    tokenizer = load_tokenizer(resolved.spec.base, trust_remote_code)
    batch = prompt_batch(tokenizer, prompts)
    reference = model_logits(model, batch)
    dequantized = merge_into_base(model, resolved)
    flags = enable_bias_flags(model)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model.to(torch_dtype)
    with atomic_folder(out, overwrite=overwrite, protected=[adapter_dir]) as tmp:
        if requantize:
            with tempfile.TemporaryDirectory(dir=tmp.parent) as dense:
                model.save_pretrained(dense, safe_serialization=True)
                quantized = AutoModelForCausalLM.from_pretrained(
                    dense, dtype=torch_dtype, quantization_config=requantized_as, device_map="cpu"
                )
                quantized.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del model
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype, local_files_only=True, device_map="cpu",
                                                   trust_remote_code=trust_remote_code)
    written.eval()
    for module in written.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # bitsandbytes would repack NF4 layers for its fused CPU kernel in eval mode, which fails
            # for widths that are not multiples of the block size; measure with the plain kernel
            module.support_avx512bf16_for_cpu = False
    merged = model_logits(written, batch)
    return MergedExport(
        out=out,
        dtype=dtype,
        methods=[d.name for d in resolved.deltas],
        max_abs_logit_diff=max(float((a - b).abs().max()) for a, b in zip(reference, merged)),
        max_abs_logit=max(float(a.abs().max()) for a in reference),
        prompts=len(batch),
        tokens=sum(int(ids.shape[1]) for ids in batch),
        dequantized_layers=dequantized,
        bias_flags=flags,
        requantized=requantize,
        quantizer=resolved.quantizer.name if resolved.quantizer else None,
    )
