"""NF4: the 4-bit NormalFloat base weights of QLoRA (Dettmers et al., 2023), on bitsandbytes.

QLoRA fine-tunes a *frozen* base model whose linear weights are stored in 4 bits, with small
trainable deltas (LoRA, …) on top in 16/32 bits. Gradients flow *through* the 4-bit layers to the
deltas and to earlier layers, never *into* the 4-bit weights.

NF4 stores a weight matrix ``W`` (``out x in``, flattened row by row, cut into blocks of 64)::

    absmax_b = max |W_i| over block b                       one fp32 constant per block
    q_i      = argmin_k |W_i / absmax_b - NF4[k]|           a 4-bit index, two per byte
    W'_i     = NF4[q_i] * absmax_b                          dequantization

``NF4`` holds 16 levels in ``[-1, 1]`` at quantiles of N(0, 1) (with an exact zero), so for normally
distributed weights, which trained weights roughly are, every level is about equally likely. On
N(0, 1) weights its relative error is lower than that of bitsandbytes' FP4 (the nf4 tests measure both).

*Double quantization* quantizes the fp32 ``absmax`` constants too: minus their mean, 8-bit
blockwise in blocks of 256, leaving one fp32 scale per 256 blocks. Storage per weight::

    without: 4 + 32/64               = 4.5   bits  (0.281x of bf16)
    with:    4 + 8/64 + 32/(64*256)  ≈ 4.127 bits  (0.258x of bf16)

plus a 16-entry and a 256-entry code table per layer (about 1 KiB per layer).

The forward pass dequantizes and multiplies in the *compute dtype*: ``y = x @ dequantize(W).T + b``,
in bf16 on CPUs with AVX-512 BF16 / AMX (``compute_dtype: auto``), else fp32.

Everything here is bitsandbytes' own code: ``bnb.nn.Linear4bit`` / ``bnb.nn.Params4bit`` and
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``; this module only selects layers,
swaps them and reads them back.

bitsandbytes on CPU (checked with 0.50.2)
-----------------------------------------
* Quantization happens when a not-yet-quantized ``Params4bit`` is moved with ``.to(device)`` (also
  to the CPU it already is on); ``quantize`` does exactly that for each layer, on the device the
  layer's weight lives on, and builds the ``Linear4bit`` on the meta device so no throw-away dense
  weight is allocated.
* On CPUs with AVX-512 BF16, ``Linear4bit.forward`` in eval mode without autograd rewrites the
  layer's storage into a layout for a fused CPU kernel (double quantization undone, ``absmax`` in
  bf16). That kernel is faster for one token but slower than dequantize + bf16 matmul for a batch of
  rows, and turning the layout back (``state_dict()``, ``.cuda()``) is lossy with double
  quantization and garbles the weights without it (absmax left transposed). It is therefore off
  (``cpu_fused_inference: false``); :meth:`NF4.dequantize_weight` reads either layout.
* ``Linear4bit.forward`` casts the bias parameter to the compute dtype *in place*, which would turn
  a trainable fp32 bias (BitFit) into bf16 — its gradient, optimizer state and saved adapter too.
  The layers built here are :class:`Linear4bit`, which hands bitsandbytes an out-of-place cast
  instead (same numbers, parameter untouched).
* Paged optimizers are CUDA-only (they page optimizer state through CUDA unified memory; on CPU
  bitsandbytes 0.50 silently falls back to a plain optimizer). They are an optimizer matter, not a
  quantizer option: asking for one here is a configuration error that says so.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from typing import Any, ClassVar, Literal

# bitsandbytes logs, at import, that an optional "kernels" package (fetched from a model hub at run
# time) is missing for its fused CPU path; deltatune turns that path off and never downloads, so the
# warning would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator  # noqa: E402
from torch import nn  # noqa: E402

from deltatune.api import (TARGETS_HELP, ConfigError, base_weight, compute_dtype, find_targets, get_submodule_parent, hookimpl,
                           iter_expert_parameters, target_matches, wrap_experts)

__all__ = [
    "NF4",
    "NF4Config",
    "NF4Experts",
    "Linear4bit",
    "dequantize_weight",
    "is_quantized",
    "memory_report",
    "quantization_error",
    "requantize",
    "resolve_compute_dtype",
    "storage_bytes",
]

logger = logging.getLogger(__name__)

QUANT_TYPE = "nf4"


class NF4Config(BaseModel):
    """Options of the ``nf4`` quantizer."""

    model_config = ConfigDict(extra="forbid")

    double_quant: bool = Field(
        True, description="also quantize the per-block absmax constants (QLoRA's double quantization)"
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="weights per absmax block (QLoRA uses 64)"
    )
    compute_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="dtype of the dequantized matmul; auto: bf16 where the hardware has it, else fp32"
    )
    targets: list[str] | Literal["all-linear", "attention", "mlp"] = Field(
        "all-linear",
        description=TARGETS_HELP,
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="module-name suffixes or 're:REGEX' left dense even when targeted",
    )
    experts: bool = Field(
        True, description="also quantize MoE expert parameters (transformers 5's 3-D expert weights), one "
        "expert's 2-D weight at a time")
    cpu_fused_inference: bool = Field(
        False,
        description="let bitsandbytes repack layers for its fused AVX-512 BF16 kernel in eval mode without "
        "autograd (faster single-token generation, slower batches, lossy to undo)",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_paged(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if "paged" in str(key).lower():
                    raise ValueError(
                        f"'{key}': paged optimizers are CUDA-only in bitsandbytes (they page optimizer state "
                        "through CUDA unified memory; on CPU bitsandbytes silently falls back to a plain "
                        "optimizer), and they are an optimizer option, not a quantizer one: choose a paged "
                        "optimizer in the optimizer plugin's options on a CUDA machine"
                    )
        return data

    @field_validator("targets", "skip")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if isinstance(value, list):
            for pattern in value:
                if not pattern:
                    raise ValueError("empty module name")
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as exc:
                        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _fused_needs_double_quant(self) -> NF4Config:
        if self.cpu_fused_inference and not self.double_quant:
            raise ValueError(
                "cpu_fused_inference needs double_quant: true; without it bitsandbytes 0.50 garbles the "
                "weights when it converts the fused CPU layout back (state_dict, .cuda())"
            )
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets is empty: name at least one module, or use 'all-linear'")
        return self


# -- hardware -------------------------------------------------------------------------------------
def resolve_compute_dtype(choice: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype for ``choice`` (``auto``, ``bf16``, ``fp32``): the core's rule, so the
    quantized layers compute in the same dtype as the rest of the base."""
    return compute_dtype(choice)  # type: ignore[arg-type]


# -- layers ---------------------------------------------------------------------------------------
def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is an NF4 ``bnb.nn.Linear4bit`` holding quantized weights, or NF4 expert weights."""
    if isinstance(module, NF4Experts):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, bnb.nn.Linear4bit)
        and getattr(weight, "quant_type", None) == QUANT_TYPE
        and bool(getattr(weight, "bnb_quantized", False))
    )


def _require(module: nn.Module) -> bnb.nn.Linear4bit:
    if not is_quantized(module):
        raise TypeError(f"{type(module).__name__} is not an NF4-quantized layer (bnb.nn.Linear4bit, quant_type nf4)")
    return module  # type: ignore[return-value]


def _canonical(weight: torch.Tensor) -> tuple[torch.Tensor, bnbF.QuantState]:
    """Packed data and quant state in bitsandbytes' standard layout, without touching the layer.

    A layer repacked for the fused CPU kernel (``cpu_fused_inference``) is unpacked on a copy, keeping
    the bf16 absmax that kernel multiplies with rather than re-quantizing it.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    state = copy.copy(state)
    state.original_nested = False  # keep the absmax the kernel uses; do not re-quantize it
    data, state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, state)
    if state.absmax.dim() == 2:  # stored [in/blocksize, out] for the kernel → block order
        state.absmax = state.absmax.T.reshape(-1)
    state.absmax = state.absmax.float()
    return data, state


def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``out x in`` weight an NF4 layer computes with, in ``dtype`` (fp32 by default).

    fp32 is exact: every value is an NF4 level times its block's (dequantized) absmax, computed by
    ``bitsandbytes.functional.dequantize_4bit``. The forward pass rounds this to the compute dtype.
    """
    if isinstance(module, NF4Experts):
        return torch.stack([_dequantize(weight, dtype) for weight in module.weights])
    return _dequantize(_require(module).weight, dtype)


def _dequantize(weight: bnb.nn.Params4bit, dtype: torch.dtype) -> torch.Tensor:
    data, state = _canonical(weight)
    state = copy.copy(state)
    state.dtype = dtype
    return bnbF.dequantize_4bit(data, state)


class NF4Experts(nn.Module):
    """A 3-D MoE expert parameter (``experts x ...``) in NF4: each expert's 2-D weight quantized as a
    linear layer's (its own absmax blocks), stacked back by :func:`dequantize_weight`. The core holds it
    in place of the dense parameter and dequantizes it in ``compute_dtype`` for each forward."""

    def __init__(self, weight: torch.Tensor, *, blocksize: int, double_quant: bool, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if weight.is_meta:
            raise ConfigError("nf4: the weights are on the meta device; load them before quantizing")
        self.compute_dtype = compute_dtype
        self.weights = nn.ParameterList([
            bnb.nn.Params4bit(expert.detach().contiguous(), requires_grad=False, blocksize=blocksize,
                              compress_statistics=double_quant, quant_type=QUANT_TYPE).to(weight.device)
            for expert in weight
        ])

    def extra_repr(self) -> str:
        return f"experts={len(self.weights)}, expert_shape={tuple(self.weights[0].quant_state.shape)}"


class Linear4bit(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` that never changes its bias parameter's dtype.

    bitsandbytes' forward runs ``bias.data = bias.data.to(compute dtype)`` whenever the dtypes
    differ, so a bias that trains in fp32 (BitFit on an NF4 base, bf16 compute) silently became a
    bf16 parameter on the first forward. Here bitsandbytes gets the bias already cast, out of place
    and differentiably, for the duration of the call: the output is bitsandbytes' own, bit for bit,
    and gradients reach the fp32 parameter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        target = self.compute_dtype or x.dtype  # what bitsandbytes casts the input and the bias to
        if bias is None or bias.dtype == target:
            return super().forward(x)
        self._parameters["bias"] = bias.to(target)
        try:
            return super().forward(x)
        finally:
            self._parameters["bias"] = bias


def _fusable(out_features: int, in_features: int, blocksize: int) -> bool:
    """The fused CPU kernel's layout needs ``out % 32 == 0`` and ``in % blocksize == 0``."""
    return out_features % 32 == 0 and in_features % blocksize == 0


def _quantized_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    blocksize: int,
    double_quant: bool,
    compute_dtype: torch.dtype,
    cpu_fused_inference: bool,
) -> bnb.nn.Linear4bit:
    """A ``Linear4bit`` holding ``weight`` quantized to NF4 on ``weight``'s device."""
    weight = weight.detach()
    if weight.is_meta:
        raise ConfigError("nf4: the weights are on the meta device; load them before quantizing")
    out_features, in_features = weight.shape
    layer = Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=QUANT_TYPE,
        device="meta",
    )
    param = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=QUANT_TYPE,
        module=layer,
    )
    layer.weight = param.to(weight.device)  # Params4bit quantizes on its first move
    if bias is not None and not isinstance(bias, nn.Parameter):
        bias = nn.Parameter(bias.detach(), requires_grad=False)
    layer.bias = bias
    layer.support_avx512bf16_for_cpu = bool(
        cpu_fused_inference and layer.support_avx512bf16_for_cpu and _fusable(out_features, in_features, blocksize)
    )
    return layer


_LIKE: Any = object()


def requantize(weight: torch.Tensor, like: nn.Module, bias: torch.Tensor | None = _LIKE) -> bnb.nn.Linear4bit:
    """A new NF4 layer holding ``weight`` with the settings of the NF4 layer ``like``.

    For exporting a merged model in 4 bits: merge deltas into ``dequantize_weight(like)``, then
    requantize. ``bias`` defaults to ``like``'s bias (the same parameter). Measure what the second
    rounding cost with :func:`quantization_error` ``(weight, new_layer)``. Requantizing an unchanged
    dequantized weight gives back the same codes.
    """
    like = _require(like)
    return _quantized_linear(
        weight,
        like.bias if bias is _LIKE else bias,
        blocksize=like.weight.blocksize,
        double_quant=bool(like.weight.compress_statistics),
        compute_dtype=like.compute_dtype or torch.float32,
        cpu_fused_inference=bool(like.support_avx512bf16_for_cpu),
    )


def quantization_error(reference: torch.Tensor, quantized: nn.Module | torch.Tensor) -> dict[str, float]:
    """How far a quantized weight (an NF4 layer or a dense tensor) is from ``reference``.

    Returns ``max_abs``, ``mean_abs``, ``rmse`` and ``relative`` (Frobenius norm of the error over that
    of ``reference``), computed in fp32.
    """
    ref = reference.detach().float()
    approx = dequantize_weight(quantized) if isinstance(quantized, nn.Module) else quantized.detach().float()
    if approx.shape != ref.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs quantized {tuple(approx.shape)}")
    diff = approx.to(ref.device) - ref
    return {
        "max_abs": diff.abs().max().item(),
        "mean_abs": diff.abs().mean().item(),
        "rmse": diff.pow(2).mean().sqrt().item(),
        "relative": (diff.norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny)).item(),
    }


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def storage_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes an NF4 layer's weight takes, by part (bias not included).

    ``packed`` (two 4-bit codes per byte), ``absmax`` (uint8 with double quantization, else fp32),
    ``double_quant`` (the fp32 scales of the quantized absmax and their offset), ``code_tables`` (the
    NF4 levels and the 8-bit absmax code, held per layer) and ``total``.
    """
    weights = list(module.weights) if isinstance(module, NF4Experts) else [_require(module).weight]
    parts: Counter = Counter()
    for weight in weights:
        state = weight.quant_state
        state2 = getattr(state, "state2", None) if state.nested else None
        parts["packed"] += _nbytes(weight.data)
        parts["absmax"] += _nbytes(state.absmax)
        parts["double_quant"] += (_nbytes(state2.absmax) + _nbytes(state.offset)) if state2 is not None else 0
        parts["code_tables"] += _nbytes(state.code) + (_nbytes(state2.code) if state2 is not None else 0)
    parts = {key: parts[key] for key in ("packed", "absmax", "double_quant", "code_tables")}
    parts["total"] = sum(parts.values())
    return parts


def memory_report(model: nn.Module) -> dict[str, float]:
    """Storage of every NF4 layer (and NF4 expert parameter) in ``model`` summed by part, with the bf16 size of the same weights.

    Keys: ``layers``, ``weights`` (number of weights), the parts of :func:`storage_bytes`, ``bf16``
    (``2 x weights``), ``ratio`` (``total / bf16``) and ``bits_per_weight``.
    """
    report: dict[str, float] = Counter()
    for module in model.modules():
        if is_quantized(module):
            report["layers"] += 1
            report["weights"] += (sum(w.quant_state.shape.numel() for w in module.weights)
                                  if isinstance(module, NF4Experts) else module.in_features * module.out_features)
            for key, value in storage_bytes(module).items():
                report[key] += value
    keys = ("layers", "weights", "packed", "absmax", "double_quant", "code_tables", "total")
    report = {key: report.get(key, 0) for key in keys}
    report["bf16"] = 2 * report["weights"]
    report["ratio"] = report["total"] / report["bf16"] if report["bf16"] else 0.0
    report["bits_per_weight"] = 8 * report["total"] / report["weights"] if report["weights"] else 0.0
    return report


# -- choosing layers ------------------------------------------------------------------------------
def select_layers(model: nn.Module, cfg: NF4Config) -> list[str]:
    """Names of the linear layers ``cfg`` targets and does not skip (already quantized ones included).

    Raises :class:`deltatune.ConfigError` when a named target matches no linear layer.
    """
    chosen = find_targets(model, cfg.targets, "nf4")
    return [name for name in chosen if not any(target_matches(name, pattern) for pattern in cfg.skip)]


def _config(cfg: NF4Config | dict[str, Any] | None) -> NF4Config:
    return cfg if isinstance(cfg, NF4Config) else NF4Config.model_validate(cfg or {})


# -- the plugin -----------------------------------------------------------------------------------
class NF4:
    """QLoRA's NF4 quantizer: targeted linear layers (``nn.Linear``, or GPT-2's ``Conv1D``, whose
    transposed weight is quantized as a linear layer's, as transformers' own bitsandbytes loading does)
    become ``bnb.nn.Linear4bit`` (nf4); MoE expert parameters become :class:`NF4Experts`."""

    name: ClassVar[str] = "nf4"
    Config: ClassVar[type[BaseModel]] = NF4Config

    def quantize(self, model: nn.Module, cfg: NF4Config | dict[str, Any] | None = None) -> None:
        """Replace the targeted linear layers of ``model`` by NF4 layers, in place, and (``experts``) hold
        every MoE expert parameter as :class:`NF4Experts`.

        Layers already quantized (by this or another quantizer) are left as they are, so a second
        call changes nothing. A layer whose weight is tied to another module (a tied LM head) stays
        dense, with a warning: quantizing it would untie it.
        """
        cfg = _config(cfg)
        if not select_layers(model, cfg):
            raise ConfigError(f"nf4: no linear layer left to quantize (targets={cfg.targets!r}, skip={cfg.skip!r})")
        done = 0
        for name in self.linear_to_quantize(model, cfg, warn=True):
            linear = model.get_submodule(name)
            layer = _quantized_linear(
                base_weight(linear).contiguous(),  # out x in, also for a Conv1D (stored transposed)
                linear.bias,
                blocksize=cfg.blocksize,
                double_quant=cfg.double_quant,
                compute_dtype=resolve_compute_dtype(cfg.compute_dtype, linear.weight.device),
                cpu_fused_inference=cfg.cpu_fused_inference,
            )
            layer.train(linear.training)
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, layer)
            done += 1
        experts = self.quantize_experts(model, cfg) if cfg.experts else 0
        logger.info("nf4: quantized %d linear layers and %d expert parameters (blocksize %d, double_quant=%s)",
                    done, experts, cfg.blocksize, cfg.double_quant)

    def quantize_experts(self, model: nn.Module, cfg: NF4Config) -> int:
        """Hold every MoE expert parameter of ``model`` (3-D) not already quantized as :class:`NF4Experts`;
        returns how many."""
        done = 0
        for name, param_name in self.experts_to_quantize(model):
            experts = wrap_experts(model, name)
            weight = getattr(experts.base_layer, param_name)
            experts.set_quantized(param_name, NF4Experts(
                weight, blocksize=cfg.blocksize, double_quant=cfg.double_quant,
                compute_dtype=resolve_compute_dtype(cfg.compute_dtype, weight.device)))
            done += 1
        return done

    def layers_to_quantize(self, model: nn.Module, cfg: NF4Config | dict[str, Any] | None = None) -> list[str]:
        """What :meth:`quantize` replaces: the linear layers (:meth:`linear_to_quantize`), then
        (``experts``) the MoE expert parameters it would hold quantized, by parameter name."""
        chosen = self.linear_to_quantize(model, cfg)
        if _config(cfg).experts:
            chosen += [f"{name}.{param_name}" for name, param_name in self.experts_to_quantize(model)]
        return chosen

    def linear_to_quantize(self, model: nn.Module, cfg: NF4Config | dict[str, Any] | None = None,
                           warn: bool = False) -> list[str]:
        """The linear layers :meth:`quantize` replaces: :func:`select_layers` less those already quantized
        or not floating-point, and those whose weight is tied to another module (``warn``: log each)."""
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        chosen = []
        for name in select_layers(model, _config(cfg)):
            linear = model.get_submodule(name)
            if is_quantized(linear) or not linear.weight.is_floating_point():
                continue
            if uses[id(linear.weight)] > 1:
                if warn:
                    logger.warning("nf4: '%s' shares its weight with another module (tied); left dense", name)
                continue
            chosen.append(name)
        return chosen

    @staticmethod
    def experts_to_quantize(model: nn.Module) -> list[tuple[str, str]]:
        """``(experts module, parameter)`` of every MoE expert parameter not yet quantized."""
        return [(name, param_name) for name, param_name, module in iter_expert_parameters(model)
                if param_name not in getattr(module, "quantized", {})]

    def bits_per_weight(self, cfg: NF4Config) -> float:
        """Storage bits per weight: a 4-bit code plus its block's absmax — fp32, or with double
        quantization 8 bits plus one fp32 scale per 256 blocks (the module docstring's formula)."""
        if cfg.double_quant:
            return 4 + 8 / cfg.blocksize + 32 / (cfg.blocksize * 256)
        return 4 + 32 / cfg.blocksize

    def transformers_quantization_config(self, cfg: NF4Config) -> Any:
        """``transformers``' ``BitsAndBytesConfig`` that quantizes dense weights as ``cfg`` does
        (``re:`` skip patterns cannot be expressed there and are left out)."""
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32
        skip = [s for s in cfg.skip if not s.startswith("re:")]
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE, bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip or None,
        )

    def is_quantized(self, module: nn.Module) -> bool:
        """Whether ``module`` is an NF4 layer (see :func:`is_quantized`)."""
        return is_quantized(module)

    def dequantize_weight(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense fp32 weight ``module`` computes with (see :func:`dequantize_weight`)."""
        return dequantize_weight(module, dtype)

    def requantize(self, weight: torch.Tensor, like: nn.Module, bias: torch.Tensor | None = _LIKE) -> nn.Module:
        """A new NF4 layer holding ``weight`` with ``like``'s settings (see :func:`requantize`)."""
        return requantize(weight, like, bias)

    def quantization_error(self, reference: torch.Tensor, quantized: nn.Module | torch.Tensor) -> dict[str, float]:
        """Error of ``quantized`` against ``reference`` (see :func:`quantization_error`)."""
        return quantization_error(reference, quantized)


@hookimpl
def deltatune_register_quantizers(register):
    """Register the ``nf4`` quantizer."""
    register(NF4)
