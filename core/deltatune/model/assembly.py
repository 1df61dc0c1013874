"""Assembling the model a run trains: load base → quantizer → delta methods → freeze.

This is independent of Lightning so that ``fit``, ``generate``, ``export`` and tests build models
the same way. :func:`resolve_spec` validates every plugin reference and option *before* any weight
is loaded; :func:`build_model` then does the work. A delta method that starts from a PEFT adapter
(``init_from``) is resolved and built by :mod:`deltatune.io.peft` around these two
(:func:`~deltatune.io.peft.resolve_with_peft_init`, :func:`~deltatune.io.peft.build_with_peft_init`).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from deltatune.deltas.layer import base_weight, is_quantized_param, mark_quantized

from deltatune.model import loading as models
from deltatune.model.families import installed_families
from deltatune.model.logits import head_plan
from deltatune.plugin.resolve import PluginRef, ResolvedPlugin, coerce_ref, resolve
from deltatune.errors import ConfigError
from deltatune.plugin.manager import PluginManager

DType = Literal["auto", "bf16", "fp32"]


class ModelSpec(BaseModel):
    """What to train: the base model, an optional quantizer, the delta methods in order."""

    model_config = ConfigDict(extra="forbid")

    base: str = models.DEFAULT_MODEL
    quantizer: PluginRef | None = None
    delta: list[PluginRef] = []
    base_dtype: DType = "auto"
    trainable_dtype: Literal["fp32", "bf16"] = "fp32"
    trust_remote_code: bool = False

    @field_validator("delta", mode="before")
    @classmethod
    def _delta_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, (str, dict, PluginRef)) else value


@dataclass
class ResolvedSpec:
    """A :class:`ModelSpec` with every plugin looked up and its options validated."""

    spec: ModelSpec
    quantizer: ResolvedPlugin | None
    deltas: list[ResolvedPlugin] = field(default_factory=list)
    families: list[Any] | None = None
    """The installed model-family plugins (:mod:`deltatune.model.families`); ``None``: the process-wide ones."""

    @property
    def full_finetune(self) -> bool:
        """No delta method: every parameter trains."""
        return not self.deltas


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86: AVX-512 BF16 or AMX; Arm: the BF16 extension).

    Reads ``/proc/cpuinfo``: ``torch.backends.cpu.get_cpu_capability()`` only says ``AVX512``, which
    CPUs without BF16 report too.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(fh.read().split())
    except OSError:
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return "bf16" in flags


def compute_dtype(choice: DType) -> torch.dtype:
    """The dtype frozen weights are held and multiplied in: ``auto`` is bf16 where supported."""
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def resolve_spec(spec: ModelSpec | dict[str, Any], manager: PluginManager | None = None) -> ResolvedSpec:
    """Validate plugin names, options and their combination; loads no weights."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
    quantizer = resolve("quantizer", spec.quantizer, manager) if spec.quantizer else None
    deltas = [resolve("delta_method", coerce_ref(ref), manager) for ref in spec.delta]
    seen: set[str] = set()
    for delta in deltas:
        if delta.name in seen:
            raise ConfigError(f"delta method '{delta.name}' is listed twice; merge its options into one entry")
        seen.add(delta.name)
        if quantizer and not delta.plugin.supports_quantized:
            raise ConfigError(
                f"delta method '{delta.name}' cannot sit on quantizer '{quantizer.name}': it needs a dense base"
            )
        dense_base_reason = delta.optional("dense_base_reason")
        reason = dense_base_reason(delta.cfg) if quantizer and dense_base_reason else None
        if reason:
            raise ConfigError(f"delta method '{delta.name}' cannot sit on quantizer '{quantizer.name}': {reason}")
    if quantizer and not deltas:
        raise ConfigError(
            f"quantizer '{quantizer.name}' without a delta method would train quantized weights, which "
            "cannot be trained; add a delta method (`deltatune plugins` lists them) or remove the quantizer"
        )
    families = installed_families(manager) if manager is not None else None
    return ResolvedSpec(spec=spec, quantizer=quantizer, deltas=deltas, families=families)


def check_on_skeleton(resolved: ResolvedSpec) -> nn.Module:
    """Apply the delta methods to the base model's skeleton (built on the meta device from its config;
    no weight is read) and claim its parameters, so that a model that is not a causal decoder, targets
    that match nothing, sizes that do not fit the layers (a rank above a layer's width) and
    conflicting claims fail before any weight loads. Fresh plugin instances keep the run's own clean
    and what the methods print is left to the real run. Returns the skeleton, for further checks."""
    spec = resolved.spec
    # a check leaves the run as it found it: building the skeleton may seed or draw from the global RNG
    with torch.random.fork_rng(devices=[]):
        skeleton = models.model_skeleton(spec.base, spec.trust_remote_code)
        fresh = [replace(delta, plugin=delta.info.cls()) for delta in resolved.deltas]
        with open(os.devnull, "w") as silent, contextlib.redirect_stdout(silent):  # the real run reports
            for delta in fresh:
                delta.plugin.apply(skeleton, delta.cfg)
            claim_parameters(skeleton, replace(resolved, deltas=fresh))
    return skeleton


def apply_quantizer(model: nn.Module, quantizer: ResolvedPlugin) -> None:
    """Quantize ``model`` and mark every quantized module so :func:`base_weight` works."""
    quantizer.plugin.quantize(model, quantizer.cfg)
    for module in model.modules():
        if quantizer.plugin.is_quantized(module):
            mark_quantized(module, quantizer.plugin.dequantize_weight)


def claim_parameters(model: nn.Module, resolved: ResolvedSpec) -> dict[str, str]:
    """Freeze all but the claimed parameters; return ``{parameter name: method}``.

    Two methods claiming one parameter is a :class:`ConfigError` naming both and the module.
    """
    owners: dict[str, str] = {}
    for name, param in model.named_parameters():
        claimers = [d.name for d in resolved.deltas if d.plugin.trainable(name, param)]
        if len(claimers) > 1:
            module = name.rsplit(".", 1)[0]
            raise ConfigError(
                f"delta methods '{claimers[0]}' and '{claimers[1]}' both claim parameter '{name}' "
                f"(module '{module}'); give them different targets"
            )
        if resolved.full_finetune:
            claimers = ["full"] if param.is_floating_point() else []
        param.requires_grad_(bool(claimers))
        if claimers:
            owners[name] = claimers[0]
    if not owners:
        raise ConfigError("no parameter is trainable: the delta methods' targets select nothing")
    return owners


def cast_parameters(model: nn.Module, frozen: torch.dtype, trainable: torch.dtype) -> None:
    """Hold frozen floating-point weights in ``frozen`` and trainable ones in ``trainable``."""
    for param in model.parameters():
        if not param.is_floating_point() or is_quantized_param(param):
            continue
        target = trainable if param.requires_grad else frozen
        if param.dtype != target:
            param.data = param.data.to(target)


def build_model(resolved: ResolvedSpec, model: nn.Module | None = None) -> nn.Module:
    """The model ``resolved`` describes, ready to train (loaded from its base unless given)."""
    spec = resolved.spec
    dtype = compute_dtype(spec.base_dtype)
    loaded = torch.float32
    if model is None:
        # The frozen base ends up in ``dtype``: load it so (no transient fp32 copy of the whole base)
        # unless a quantizer reads the fp32 weights or no delta method (full fine-tuning) trains them.
        if dtype != torch.float32 and resolved.deltas and not resolved.quantizer:
            loaded = dtype
        model = models.load_model(spec.base, loaded, spec.trust_remote_code)
    if not any(p.is_meta for p in model.parameters()):
        # once, on the base: how the loss gets the model's logits (what follows the LM head is the base's;
        # a delta on the head itself is re-checked); refuses a model that is not a causal decoder
        head_plan(model, resolved.families)
    if resolved.quantizer:
        apply_quantizer(model, resolved.quantizer)
    for delta in resolved.deltas:
        delta.plugin.apply(model, delta.cfg)
    claim_parameters(model, resolved)
    if loaded != torch.float32 and any(p.requires_grad and ".deltas." not in n for n, p in model.named_parameters()):
        # a method trains weights of the base itself (BitFit's biases, norms): they start from fp32
        return build_model(resolved, models.load_model(spec.base, torch.float32, spec.trust_remote_code))
    cast_parameters(model, dtype, torch.bfloat16 if spec.trainable_dtype == "bf16" else torch.float32)
    return model


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (tied weights counted once)."""
    total = trainable = 0
    for param in model.parameters():
        count = param.numel() * (2 if getattr(param, "quant_type", None) else 1)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen base computes in (the dtype of its first floating-point weight)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)


def compute_context(model: nn.Module) -> torch.autocast:
    """Autocast to bf16 when the base is held in bf16 (trainable fp32 weights then mix safely)."""
    device = next(model.parameters()).device.type
    enabled = model_dtype(model) == torch.bfloat16
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; its train/eval mode as before afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place with ``torch.compile`` (dynamic shapes:
    batches of every length share one graph); parameters and state-dict keys are unchanged.
    Returns the number of layers compiled; a model without ``get_decoder().layers`` is a
    :class:`~deltatune.errors.ConfigError`."""
    getter = getattr(model, "get_decoder", None)
    layers_ = getattr(getter(), "layers", None) if callable(getter) else None
    if not isinstance(layers_, nn.ModuleList) or len(layers_) == 0:
        raise ConfigError(f"model.compile: {type(model).__name__} has no decoder layers to compile "
                          "(expected model.get_decoder().layers); set compile: false")
    for layer in layers_:
        layer.compile(dynamic=True)
    return len(layers_)
