"""Export and import: PEFT adapter folders, and merged Hugging Face models.

**PEFT export** (:func:`export_peft`) writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained(base, folder)`` loads with the same logits as the deltatune
adapter. Each delta method says what it is in PEFT terms (``peft_config(cfg)``) and names its
tensors the PEFT way (the optional member ``peft_state_dict`` of
:class:`~deltatune.plugin.protocols.DeltaMethod`); this module
fills ``target_modules`` with the exact names of the wrapped layers, ``base_model_name_or_path``,
and joins the methods: PEFT holds *one* tuner type per adapter, so exactly one method must give a
``peft_type`` (LoRA, DoRA, VeRA) and the others may only add fields (BitFit adds ``bias: "all"``).
Anything else (DoRA + LoRA, BitFit-added biases, BitFit alone) is a :class:`ConfigError` that
points to the merged export. An adapter trained on a quantized base exports the same way (as QLoRA
adapters are); PEFT gives identical logits on a base quantized the same way.

**PEFT import**: a method option ``init_from: FOLDER`` starts the method from a PEFT adapter
(LoRA, rsLoRA, DoRA, VeRA). Options the user did not set are *adopted* from the folder's
``adapter_config.json`` when the run is resolved, before any weight loads (:func:`adopt_peft_options`),
so ``{name: lora, config: {init_from: DIR}}`` is enough and the saved deltatune manifest records the
real ``r``/``alpha``; options the user did set must agree on what shapes the weights (``r``,
``alpha``, ``rslora``, DoRA or not) or the run stops with the differing values. After the deltas are
created, :func:`load_peft_weights` loads the tensors strictly: the PEFT adapter's modules must be
exactly the layers the method targets. :func:`resolve_with_peft_init` and
:func:`build_with_peft_init` are the model layer's ``resolve_spec`` and ``build_model`` with these two
steps added; whatever builds a model from a user's spec (training, ``generate``) goes through them. :func:`load_peft_adapter` builds a ready model from a PEFT
folder alone (for generate/validate/test).

**Merged export** (:func:`export_merged`) folds every delta into the base weights, dequantizes a
quantized base, removes the wrappers and writes a plain Hugging Face folder (safetensors, config,
tokenizer) that ``transformers`` alone loads; BitFit-added biases switch on the architecture's
``*_bias`` config flags (zero biases elsewhere). It then reloads the folder with ``transformers`` and
reports the largest absolute logit difference against the adapter model on a few prompts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.deltas.layer import delta_layers, dense_copy, get_submodule_parent, is_quantized, unwrap
from deltatune.io.adapter import adapter_spec, load_adapter_weights
from deltatune.io.atomic import atomic_folder, check_target
from deltatune.plugin.resolve import PluginRef, ResolvedPlugin, format_validation_error
from deltatune.errors import ConfigError
from deltatune.model.loading import resolve_base
from deltatune.model.assembly import ModelSpec, ResolvedSpec, build_model, compute_context, resolve_spec
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.protocols import optional_member

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_METHOD_NAMES: dict[tuple[str, bool], str] = {("LORA", False): "lora", ("LORA", True): "dora", ("VERA", False): "vera"}
"""``(peft_type, use_dora)`` → the deltatune method that reads such an adapter."""
PEFT_DEFAULTS: dict[str, Any] = {
    "use_dora": False, "use_rslora": False, "lora_dropout": 0.0, "vera_dropout": 0.0, "bias": "none",
    "save_projection": True, "d_initial": 0.1, "projection_prng_key": 0, "lora_alpha": 8,
}
"""PEFT's defaults for keys an ``adapter_config.json`` may leave out."""
STRUCTURAL_KEYS = ("peft_type", "use_dora", "r", "lora_alpha", "use_rslora")
"""PEFT config keys that decide the weights' shapes or meaning: an explicit option must agree."""
UNSUPPORTED: dict[str, Any] = {
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
    "target_parameters": None, "lora_bias": False, "trainable_token_indices": None,
    "layer_replication": None,
}
"""PEFT features deltatune cannot start from, with the value that means "not used"."""
PROMPTS = (
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Translate 'good morning' into French.",
    "List three prime numbers.",
)


# -- reading PEFT folders ------------------------------------------------------------------------
def read_peft_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a PEFT adapter folder (clear error if it is not one)."""
    path = Path(folder).expanduser() / PEFT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder: {PEFT_CONFIG} is missing")
    config = json.loads(path.read_text())
    if config.get("peft_type") not in {t for t, _ in PEFT_METHOD_NAMES}:
        raise ConfigError(f"{path}: PEFT type {config.get('peft_type')!r} is not supported (LORA, VERA are)")
    return config


def read_peft_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder (safetensors only; ``.bin`` files are never unpickled)."""
    path = Path(folder).expanduser() / PEFT_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{folder}: {PEFT_WEIGHTS} is missing (deltatune reads safetensors PEFT adapters only)")
    return load_file(str(path))


def peft_method_name(config: dict[str, Any]) -> str:
    """The deltatune delta method that reads a PEFT adapter with this ``adapter_config.json``."""
    return PEFT_METHOD_NAMES[(config["peft_type"], bool(config.get("use_dora", False)))]


def _peft_value(config: dict[str, Any], key: str) -> Any:
    return config.get(key, PEFT_DEFAULTS.get(key))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _targets_from_peft(value: Any) -> list[str] | str:
    """PEFT ``target_modules`` as a deltatune ``targets`` option (a string is a full-match regex)."""
    return f"re:{value}" if isinstance(value, str) else sorted(value)


def check_peft_config(method: Any, cfg: Any, config: dict[str, Any], folder: str | Path) -> None:
    """Raise :class:`ConfigError` unless the PEFT ``config`` describes the weights ``method`` with
    ``cfg`` creates (type, DoRA, rank, alpha, rsLoRA) and uses no feature deltatune lacks."""
    ours = method.peft_config(cfg)
    if not ours or "peft_type" not in ours:
        raise ConfigError(f"delta method '{method.name}' cannot start from a PEFT adapter (init_from)")
    kind = peft_method_name(config)
    if kind != method.name:
        raise ConfigError(
            f"{folder} is a PEFT {kind} adapter (peft_type {config['peft_type']}, use_dora "
            f"{bool(config.get('use_dora'))}); start from it with delta method '{kind}', not '{method.name}'"
        )
    for key in STRUCTURAL_KEYS:
        if key in ours and not _same(ours[key], _peft_value(config, key)):
            raise ConfigError(
                f"{method.name}: the configuration gives {key}={ours[key]!r} but the PEFT adapter at {folder} "
                f"has {key}={_peft_value(config, key)!r}; remove the option to adopt the adapter's value"
            )
    for key, unused in UNSUPPORTED.items():
        if config.get(key, unused) not in (unused, None, {}, [], False):
            raise ConfigError(f"{folder}: PEFT option {key}={config[key]!r} is not supported by deltatune's init_from")
    if _peft_value(config, "bias") != "none":
        raise ConfigError(
            f"{folder}: the PEFT adapter also trains biases (bias={config['bias']!r}); init_from loads "
            f"{method.name} weights only"
        )


# -- import ---------------------------------------------------------------------------------------
def adopt_peft_options(plugin: ResolvedPlugin) -> ResolvedPlugin:
    """``plugin`` with the options it did not set taken from its ``init_from`` PEFT adapter config.

    Options set explicitly must agree with the adapter where they shape the weights; the rest
    (dropout, …) may differ. Reads only ``adapter_config.json`` (no weights).
    """
    folder = plugin.cfg.init_from
    config = read_peft_config(folder)
    fields = plugin.optional("peft_fields")
    given = set(plugin.ref.config)
    adopted: dict[str, Any] = {}
    for ours, theirs in fields.items():
        if ours in given or ours not in type(plugin.cfg).model_fields or theirs not in config:
            continue
        value = config[theirs]
        adopted[ours] = _targets_from_peft(value) if ours == "targets" else value
    options = {**plugin.ref.config, **adopted}
    try:
        cfg = type(plugin.cfg).model_validate(options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error("delta_method", plugin.name, exc)) from None
    check_peft_config(plugin.plugin, cfg, config, folder)
    return ResolvedPlugin(ref=PluginRef(name=plugin.ref.name, config=options), info=plugin.info, plugin=plugin.plugin, cfg=cfg)


def load_peft_weights(model: nn.Module, method: Any, cfg: Any, folder: str | Path) -> None:
    """Load the PEFT adapter at ``folder`` into ``method``'s freshly created deltas in ``model``.

    Strict: every tensor the deltas need must be there with its shape, and every tensor there must
    belong to a targeted layer; otherwise a :class:`ConfigError` names examples.
    """
    config = read_peft_config(folder)
    check_peft_config(method, cfg, config, folder)
    load = optional_member("delta_method", method, "load_peft_state_dict")
    named = optional_member("delta_method", method, "peft_state_dict")
    if load is None or named is None:
        raise ConfigError(f"delta method '{method.name}' cannot load PEFT weights")
    state = read_peft_state(folder)
    load(model, cfg, state)
    extra = sorted(set(state) - set(named(model, cfg)))
    if extra:
        raise ConfigError(
            f"{method.name}: the PEFT adapter at {folder} holds {len(extra)} tensor(s) for modules this "
            f"configuration does not target, e.g. {extra[:3]}; align `targets` with its target_modules "
            f"{config.get('target_modules')}"
        )


def starts_from_peft(delta: ResolvedPlugin) -> bool:
    """Whether the delta method ``delta`` is configured to start from a PEFT adapter (``init_from``)."""
    return bool(getattr(delta.cfg, "init_from", None))


def resolve_with_peft_init(spec: ModelSpec | dict[str, Any], manager: PluginManager | None = None) -> ResolvedSpec:
    """:func:`~deltatune.model.assembly.resolve_spec`, then every delta method with ``init_from``
    adopts the options it leaves unset from its PEFT adapter's config (:func:`adopt_peft_options`)."""
    resolved = resolve_spec(spec, manager)
    deltas = [adopt_peft_options(d) if starts_from_peft(d) else d for d in resolved.deltas]
    return dataclasses.replace(resolved, deltas=deltas)


def build_with_peft_init(resolved: ResolvedSpec, model: nn.Module | None = None) -> nn.Module:
    """:func:`~deltatune.model.assembly.build_model`, then every delta method with ``init_from``
    loads its PEFT adapter's weights (:func:`load_peft_weights`)."""
    model = build_model(resolved, model)
    for delta in resolved.deltas:
        if starts_from_peft(delta):
            load_peft_weights(model, delta.plugin, delta.cfg, delta.cfg.init_from)
    return model


def load_peft_adapter(
    folder: str | Path, base: str | None = None, *, base_dtype: Literal["auto", "bf16", "fp32"] = "fp32",
    manager: PluginManager | None = None,
) -> tuple[nn.Module, ResolvedSpec]:
    """A model (eval mode) running the PEFT adapter at ``folder``, and the spec that builds it.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. The spec is an ordinary
    deltatune spec with ``init_from: folder``, so fit/generate/validate use the same mechanism.
    """
    config = read_peft_config(folder)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{folder}: adapter_config.json names no base model; pass base=")
    ref = {"name": peft_method_name(config), "config": {"init_from": str(folder)}}
    resolved = resolve_with_peft_init(ModelSpec(base=base, delta=[ref], base_dtype=base_dtype), manager)
    model = build_with_peft_init(resolved)
    model.eval()
    return model, resolved


# -- PEFT export ----------------------------------------------------------------------------------
def peft_export(model: nn.Module, resolved: ResolvedSpec) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT ``adapter_config.json`` content and tensors for ``model`` (nothing is written).

    Raises :class:`ConfigError` (suggesting ``--format merged``) for a combination PEFT cannot hold.
    """
    hint = "; export it with `deltatune export --format merged` instead"
    if resolved.full_finetune:
        raise ConfigError("a full fine-tune has no PEFT adapter form" + hint)
    parts = [(d, d.plugin.peft_config(d.cfg)) for d in resolved.deltas]
    for delta, part in parts:
        if part is None:
            raise ConfigError(f"delta method '{delta.name}' has no PEFT equivalent" + hint)
    typed = [(d, p) for d, p in parts if "peft_type" in p]
    if len(typed) != 1:
        names = " + ".join(d.name for d in resolved.deltas)
        why = "none of them is a PEFT adapter type" if not typed else (
            f"{' and '.join(d.name for d, _ in typed)} would each need their own PEFT adapter"
        )
        raise ConfigError(f"PEFT holds one adapter type per adapter, and in {names} {why}" + hint)
    main, config = typed[0][0], dict(typed[0][1])
    for delta, part in parts:
        if delta is main:
            continue
        for key, value in part.items():
            if key in config and config[key] != PEFT_DEFAULTS.get(key) and config[key] != value:
                raise ConfigError(f"'{delta.name}' needs PEFT {key}={value!r} but '{main.name}' has {config[key]!r}" + hint)
            config[key] = value
    targets = sorted(name for name, _, _ in delta_layers(model, main.name))
    base = resolve_base(resolved.spec.base)
    config.update(target_modules=targets, base_model_name_or_path=str(base), task_type="CAUSAL_LM", inference_mode=True)
    if any(layer.transposed for _, layer, _ in delta_layers(model, main.name)):
        config["fan_in_fan_out"] = True  # PEFT's flag for Conv1D targets (GPT-2); it leaves nn.Linear ones as they are
    state: dict[str, torch.Tensor] = {}
    for delta, _ in parts:
        named = delta.optional("peft_state_dict")
        if named is None:
            raise ConfigError(f"delta method '{delta.name}' cannot name its tensors for PEFT" + hint)
        for key, value in named(model, delta.cfg).items():
            state[key] = value.detach().to("cpu").contiguous().clone()
    return config, state


def export_peft(adapter_dir: str | Path, out: str | Path, manager: PluginManager | None = None,
                trust_remote_code: bool = False, *, overwrite: bool = False) -> Path:
    """Write the deltatune adapter at ``adapter_dir`` as a PEFT adapter folder ``out``; return ``out``
    (``trust_remote_code``: the user allows the base model's own code).

    An existing ``out`` is replaced only with ``overwrite`` and only if deltatune wrote it; it is checked
    before anything loads (:func:`~deltatune.io.atomic.check_target`) and can never be the adapter itself.
    """
    out = Path(out)
    check_target(out, overwrite=overwrite, protected=[Path(adapter_dir)])
    model, resolved = _load_for_export(Path(adapter_dir), manager, trust_remote_code)
    config, state = peft_export(model, resolved)
    with atomic_folder(out, overwrite=overwrite, protected=[Path(adapter_dir)]) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _load_for_export(folder: Path, manager: PluginManager | None,
                     trust_remote_code: bool = False) -> tuple[nn.Module, ResolvedSpec]:
    """The adapter's model with an fp32 base (so merging is exact), in eval mode.

    Quantized layers multiply in fp32 too: their own compute dtype (bf16 for nf4 ``auto`` on bf16
    hardware) would otherwise round both the reference logits and, through
    :meth:`~deltatune.deltas.layer.DeltaLinear.merge_delta`, the merged weights.
    """
    spec = adapter_spec(folder, trust_remote_code=trust_remote_code)
    resolved = resolve_spec(spec.model_copy(update={"base_dtype": "fp32"}), manager)
    model = build_model(resolved)
    for module in model.modules():
        if is_quantized(module) and getattr(module, "compute_dtype", None) is not None:
            module.compute_dtype = torch.float32
    if not resolved.full_finetune:
        load_adapter_weights(model, resolved, folder)
    model.eval()
    return model, resolved


# -- merged export --------------------------------------------------------------------------------
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

    def __str__(self) -> str:
        methods = " + ".join(self.methods) or "full fine-tune"
        lines = [
            f"merged model ({methods}) written to {self.out} ({self.dtype}{', requantized to nf4' if self.requantized else ''})",
            f"largest |logit difference| vs the adapter model: {self.max_abs_logit_diff:.3g} "
            f"(logits up to {self.max_abs_logit:.3g}; {self.prompts} prompts, {self.tokens} tokens)",
        ]
        if self.dequantized_layers:
            lines.append(f"dequantized {self.dequantized_layers} quantized layers")
        if self.bias_flags:
            lines.append(f"config flags switched on for BitFit biases: {', '.join(self.bias_flags)}")
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
    dequantized = 0
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, dense_copy(module))
            dequantized += 1
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return dequantized


def enable_bias_flags(model: nn.Module) -> list[str]:
    """Switch on the config's ``*_bias`` flags the model's biases need (BitFit-added biases), and
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


def _requantize_config(resolved: ResolvedSpec) -> Any:
    """``transformers``' bitsandbytes NF4 config matching the adapter's quantizer options."""
    from transformers import BitsAndBytesConfig

    options = resolved.quantizer.cfg.model_dump() if resolved.quantizer else {}
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(options.get("compute_dtype", "fp32"), torch.float32)
    skip = [s for s in options.get("skip", ["lm_head"]) if not s.startswith("re:")]
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=options.get("double_quant", True),
        bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip or None,
    )


def export_merged(
    adapter_dir: str | Path, out: str | Path, *, dtype: Literal["fp32", "bf16"] = "fp32", requantize: bool = False,
    prompts: tuple[str, ...] | list[str] = PROMPTS, manager: PluginManager | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> MergedExport:
    """Write the adapter at ``adapter_dir`` merged into its base as a Hugging Face folder ``out``.

    ``dtype`` is the dtype of the written weights. ``requantize`` writes NF4 weights instead
    (``transformers`` + ``bitsandbytes`` load them). The returned report holds the largest absolute
    logit difference between the adapter model and the written model reloaded by ``transformers``.
    ``trust_remote_code``: the user allows the base model's own code (needed when the adapter says so).
    An existing ``out`` is replaced only as :func:`export_peft` replaces one.
    """
    from transformers import AutoModelForCausalLM

    from deltatune.model.loading import load_tokenizer

    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"dtype must be 'fp32' or 'bf16', not {dtype!r}")
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_target(out, overwrite=overwrite, protected=[adapter_dir])
    model, resolved = _load_for_export(adapter_dir, manager, trust_remote_code)
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
                    dense, dtype=torch_dtype, quantization_config=_requantize_config(resolved), device_map="cpu"
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
    )
