"""The deltatune adapter bundle: ``deltatune.json`` + safetensors, for any mix of methods.

``deltatune.json`` records the base model, the quantizer and every delta method with its options,
the distribution and version of every plugin, and the core version. ``adapter.safetensors`` holds
the union of every method's :meth:`~deltatune.plugin.protocols.DeltaMethod.state_dict`; a full fine-tune
(no delta method) saves the whole model as a Hugging Face folder under ``model/`` instead. Bundles
are written atomically. Loading rebuilds the model through :mod:`deltatune.model.assembly` and refuses
files whose tensors do not match what the methods create.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune import __version__
from deltatune.deltas.layer import is_quantized
from deltatune.io.atomic import atomic_folder
from deltatune.plugin.resolve import ResolvedPlugin
from deltatune.errors import ConfigError, DamagedFileError, OutputError
from deltatune.model.assembly import ModelSpec, ResolvedSpec, build_model, resolve_spec
from deltatune.plugin.manager import PluginManager

MANIFEST = "deltatune.json"
WEIGHTS = "adapter.safetensors"
FULL_MODEL = "model"
FORMAT = "deltatune-adapter"


def _plugin_record(plugin: ResolvedPlugin) -> dict[str, Any]:
    return {
        "name": plugin.name,
        "config": plugin.cfg.model_dump(mode="json"),
        "distribution": plugin.info.distribution,
        "version": plugin.info.version,
    }


def manifest(resolved: ResolvedSpec) -> dict[str, Any]:
    """The ``deltatune.json`` content describing ``resolved``."""
    spec = resolved.spec
    return {
        "format": FORMAT,
        "format_version": 1,
        "core_version": __version__,
        "base": spec.base,
        "base_dtype": spec.base_dtype,
        "trainable_dtype": spec.trainable_dtype,
        "quantizer": _plugin_record(resolved.quantizer) if resolved.quantizer else None,
        "delta": [_plugin_record(d) for d in resolved.deltas],
        "weights": FULL_MODEL if resolved.full_finetune else WEIGHTS,
        "trust_remote_code": spec.trust_remote_code,
    }


def adapter_state(model: nn.Module, resolved: ResolvedSpec) -> dict[str, torch.Tensor]:
    """Every tensor the delta methods need to be restored, by model key."""
    state: dict[str, torch.Tensor] = {}
    for delta in resolved.deltas:
        state.update({k: v.detach().contiguous() for k, v in delta.plugin.state_dict(model).items()})
    return state


def save_adapter(model: nn.Module, resolved: ResolvedSpec, out: Path, tokenizer: Any = None,
                 **target: Any) -> Path:
    """Write the bundle for ``model`` to ``out`` atomically and return ``out``.

    ``target`` (``overwrite``, ``protected``, ``hint``) goes to :func:`~deltatune.io.atomic.atomic_folder`,
    which refuses to replace what deltatune did not write; a failed write (disk full) is an
    :class:`~deltatune.errors.OutputError` and leaves the previous adapter intact.
    """
    out = Path(out)
    with atomic_folder(out, **target) as tmp:
        if resolved.full_finetune:
            model.save_pretrained(tmp / FULL_MODEL, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / FULL_MODEL)
        else:
            try:
                save_file(adapter_state(model, resolved), str(tmp / WEIGHTS), metadata={"format": "pt"})
            except SafetensorError as exc:  # the Rust writer's I/O errors (disk full) are not OSErrors
                raise OutputError(f"cannot write {out / WEIGHTS}: {exc}; "
                                  f"{'the previous adapter is intact' if out.exists() else 'nothing was written'}") from exc
        (tmp / MANIFEST).write_text(json.dumps(manifest(resolved), indent=2) + "\n")
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed ``deltatune.json`` of an adapter folder, with a clear error if it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{folder} is not a deltatune adapter: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); the adapter manifest is "
                               "damaged") from None
    except UnicodeDecodeError:
        raise DamagedFileError(f"{path}: not UTF-8 text; the adapter manifest is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a deltatune adapter manifest")
    return data


def adapter_spec(folder: Path, base: str | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """The :class:`ModelSpec` that rebuilds the model of the adapter at ``folder`` (a full fine-tune's
    base is its ``model/`` folder; ``base`` overrides the recorded one otherwise). An adapter whose
    base runs its own code is refused unless ``trust_remote_code`` says the user allows it."""
    data = read_manifest(folder)
    try:
        spec = spec_from_manifest(data, base)
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"lacks {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise DamagedFileError(f"{Path(folder) / MANIFEST}: not a valid adapter manifest ({detail})") from None
    if data.get("trust_remote_code") and not trust_remote_code:
        raise ConfigError(f"{folder} was trained on a base model that runs its own Python code (trust_remote_code "
                          f"in {MANIFEST}); pass --trust_remote_code to allow that code to run")
    update: dict[str, Any] = {"trust_remote_code": bool(data.get("trust_remote_code"))}
    if data["weights"] == FULL_MODEL:
        update["base"] = str(Path(folder) / FULL_MODEL)
    return spec.model_copy(update=update)


def spec_from_manifest(data: dict[str, Any], base: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` an adapter was trained with (``base`` overrides the recorded one)."""
    def ref(record: dict[str, Any]) -> dict[str, Any]:
        # the trained weights supersede a PEFT starting point, which need not exist any more
        config = {k: v for k, v in record["config"].items() if k != "init_from"}
        return {"name": record["name"], "config": config}

    return ModelSpec(
        base=base or data["base"],
        quantizer=ref(data["quantizer"]) if data.get("quantizer") else None,
        delta=[ref(d) for d in data["delta"]],
        base_dtype=data.get("base_dtype", "auto"),
        trainable_dtype=data.get("trainable_dtype", "fp32"),
    )


def load_adapter_weights(model: nn.Module, resolved: ResolvedSpec, folder: Path) -> None:
    """Load an adapter's tensors into a model built from the same spec; strict on the adapter's keys."""
    path = Path(folder) / WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DamagedFileError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); the adapter weights are "
                               "damaged or missing") from None
    expected = adapter_state(model, resolved)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"adapter {folder} does not fit the model its manifest describes: "
            f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ConfigError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)


def load_adapter(
    folder: Path, base: str | None = None, manager: PluginManager | None = None, trust_remote_code: bool = False,
    *, base_dtype: str | None = None,
) -> tuple[nn.Module, ResolvedSpec]:
    """Rebuild base + quantizer + deltas from ``folder`` and load the trained tensors (``trust_remote_code``:
    the user allows the base model's own code, which the adapter's manifest says it needs; ``base_dtype``
    overrides the recorded one)."""
    spec = adapter_spec(folder, base, trust_remote_code)
    if base_dtype is not None:
        spec = spec.model_copy(update={"base_dtype": base_dtype})
    resolved = resolve_spec(spec, manager)
    model = build_model(resolved)
    if not resolved.full_finetune:
        load_adapter_weights(model, resolved, folder)
    model.eval()
    return model, resolved


def load_for_export(folder: Path, manager: PluginManager | None = None,
                    trust_remote_code: bool = False) -> tuple[nn.Module, ResolvedSpec]:
    """:func:`load_adapter` with an fp32 base (so merging is exact), in eval mode.

    Quantized layers multiply in fp32 too: their own compute dtype (bf16 on bf16 hardware) would
    otherwise round both the reference logits and, through
    :meth:`~deltatune.deltas.layer.DeltaLinear.merge_delta`, the merged weights.
    """
    model, resolved = load_adapter(Path(folder), manager=manager, trust_remote_code=trust_remote_code,
                                   base_dtype="fp32")
    for module in model.modules():
        if is_quantized(module) and getattr(module, "compute_dtype", None) is not None:
            module.compute_dtype = torch.float32
    return model, resolved
