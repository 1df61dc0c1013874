"""PEFT adapter folders: export (:func:`export_peft`) and import (``init_from``, :func:`load_peft_adapter`).

**Export** writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, folder)`` loads with the same logits as the deltatune
adapter. Each delta method says what it is in PEFT terms (``peft_config(cfg)``) and names its
tensors the PEFT way (the optional member ``peft_state_dict`` of
:class:`~deltatune.plugin.protocols.DeltaMethod`); this module
fills ``target_modules`` with the exact names of the wrapped layers (``target_parameters`` with those
of the adapted MoE expert parameters), ``base_model_name_or_path``,
and joins the methods: PEFT holds *one* tuner type per adapter, so exactly one method must give a
``peft_type`` and the others may only add fields (a bias-training method adds ``bias: "all"``).
Anything else (two typed methods, biases the base model lacks, no typed method) is a
:class:`ConfigError` that points to the merged export (:mod:`deltatune.io.merged`). An adapter
trained on a quantized base exports the same way (as QLoRA adapters are); PEFT gives identical
logits on a base quantized the same way.

**Import**: a method option ``init_from: FOLDER`` starts the method from a PEFT adapter. The method
that reads a folder is the installed one whose ``reads_peft`` fields (an optional member of
:class:`~deltatune.plugin.protocols.DeltaMethod`) match its ``adapter_config.json``
(:func:`peft_reader`). Options the user did not set are *adopted* from that file when the run is
resolved, before any weight loads (:func:`adopt_peft_options`), so ``{name: METHOD, config:
{init_from: DIR}}`` is enough and the saved deltatune manifest records the real options; options
the user did set must agree where they shape the weights (:data:`STRUCTURAL_KEYS`) or the run stops
with the differing values. After the deltas are created, :func:`load_peft_weights` loads the
tensors strictly: the PEFT adapter's modules must be exactly the layers the method targets.
:func:`resolve_with_peft_init` and :func:`build_with_peft_init` are the model layer's
``resolve_spec`` and ``build_model`` with these two steps added; whatever builds a model from a
user's spec (training, ``generate``) goes through them. :func:`load_peft_adapter` builds a ready model from a PEFT folder alone (for generate/validate/test).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.deltas.experts import delta_experts
from deltatune.deltas.layer import delta_layers
from deltatune.deltas.targets import TARGET_ROLES
from deltatune.errors import ConfigError
from deltatune.io.adapter import load_for_export
from deltatune.io.atomic import atomic_folder, check_target
from deltatune.model.assembly import ModelSpec, ResolvedSpec, build_model, resolve_spec
from deltatune.model.loading import resolve_base
from deltatune.plugin.manager import PluginManager, get_plugin_manager
from deltatune.plugin.protocols import optional_member
from deltatune.plugin.resolve import PluginRef, ResolvedPlugin, format_validation_error

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_DEFAULTS: dict[str, Any] = {
    "use_dora": False, "use_rslora": False, "lora_dropout": 0.0, "vera_dropout": 0.0, "bias": "none",
    "save_projection": True, "d_initial": 0.1, "projection_prng_key": 0, "lora_alpha": 8,
}
"""PEFT's defaults for keys an ``adapter_config.json`` may leave out (PEFT's own config classes)."""
STRUCTURAL_KEYS = ("peft_type", "use_dora", "r", "lora_alpha", "use_rslora")
"""PEFT config keys that decide the weights' shapes or meaning: an explicit option must agree."""
UNSUPPORTED: dict[str, Any] = {
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
    "lora_bias": False, "trainable_token_indices": None,
    "layer_replication": None,
}
"""PEFT features deltatune cannot start from, with the value that means "not used"."""


# -- reading PEFT folders ------------------------------------------------------------------------
def read_peft_config(folder: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a PEFT adapter folder (clear error if it is not one)."""
    path = Path(folder).expanduser() / PEFT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder: {PEFT_CONFIG} is missing")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ConfigError(f"{path} names no peft_type; it is not a PEFT adapter config")
    return config


def read_peft_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder (safetensors only; ``.bin`` files are never unpickled)."""
    path = Path(folder).expanduser() / PEFT_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{folder}: {PEFT_WEIGHTS} is missing (deltatune reads safetensors PEFT adapters only)")
    return load_file(str(path))


def reads(fields: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether a method's ``reads_peft`` ``fields`` match the PEFT ``config`` (PEFT's defaults for keys
    the file leaves out)."""
    return bool(fields) and all(_peft_value(config, key) == value for key, value in fields.items())


def peft_reader(config: dict[str, Any], manager: PluginManager | None = None) -> str:
    """The installed delta method that reads a PEFT adapter with this ``adapter_config.json``."""
    manager = manager or get_plugin_manager()
    found = [name for name in manager.names("delta_method")
             if reads(optional_member("delta_method", manager.get("delta_method", name).cls, "reads_peft"), config)]
    if len(found) != 1:
        why = "no installed delta method reads" if not found else f"{' and '.join(found)} all read"
        raise ConfigError(f"{why} a PEFT adapter of type {config.get('peft_type')!r} with these fields; "
                          "a delta method declares what it reads with `reads_peft`")
    return found[0]


def _peft_value(config: dict[str, Any], key: str) -> Any:
    return config.get(key, PEFT_DEFAULTS.get(key))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _targets_from_peft(value: Any) -> list[str] | str:
    """PEFT ``target_modules`` as a deltatune ``targets`` option (a string is a full-match regex; a
    name that is a deltatune role word, :data:`~deltatune.deltas.targets.TARGET_ROLES`, is a module
    name there, so it becomes the regular expression matching that name)."""
    if isinstance(value, str):
        return f"re:{value}"
    return sorted(rf"re:(.*\.)?{re.escape(name)}" if name in TARGET_ROLES else name for name in value)


def check_peft_config(method: Any, cfg: Any, config: dict[str, Any], folder: str | Path,
                      manager: PluginManager | None = None) -> None:
    """Raise :class:`ConfigError` unless the PEFT ``config`` describes the weights ``method`` with
    ``cfg`` creates (the method reads it, :data:`STRUCTURAL_KEYS` agree) and uses no feature
    deltatune lacks."""
    ours = method.peft_config(cfg)
    if not ours or "peft_type" not in ours:
        raise ConfigError(f"delta method '{method.name}' cannot start from a PEFT adapter (init_from)")
    if not reads(optional_member("delta_method", method, "reads_peft"), config):
        kind = peft_reader(config, manager)
        raise ConfigError(
            f"{folder} is a PEFT {kind} adapter (peft_type {config['peft_type']}); start from it with "
            f"delta method '{kind}', not '{method.name}'"
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
def adopt_peft_options(plugin: ResolvedPlugin, manager: PluginManager | None = None) -> ResolvedPlugin:
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
        raise ConfigError(format_validation_error("delta_method", plugin.name, exc, list(type(plugin.cfg).model_fields))) from None
    check_peft_config(plugin.plugin, cfg, config, folder, manager)
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
    deltas = [adopt_peft_options(d, manager) if starts_from_peft(d) else d for d in resolved.deltas]
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
    ref = {"name": peft_reader(config, manager), "config": {"init_from": str(folder)}}
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
    if not all(d.optional("mergeable") for d in resolved.deltas):
        hint = "; it cannot be merged into the weights either: only the deltatune adapter bundle holds it"
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
    parameters = sorted(f"{name}.{param}" for name, _, per_param in delta_experts(model, main.name) for param in per_param)
    if parameters:
        config["target_parameters"] = parameters  # PEFT's LoRA on nn.Parameters (MoE expert weights)
    config.update(base_model_name_or_path=str(base), task_type="CAUSAL_LM", inference_mode=True)
    if targets or parameters:  # a method of virtual tokens (prefix, prompt) targets no layer: no such field
        config["target_modules"] = targets
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
    model, resolved = load_for_export(Path(adapter_dir), manager, trust_remote_code)
    config, state = peft_export(model, resolved)
    with atomic_folder(out, overwrite=overwrite, protected=[Path(adapter_dir)]) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
