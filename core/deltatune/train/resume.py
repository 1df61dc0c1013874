"""Run folders and resuming: what ``fit`` refuses to overwrite, and the run record its checkpoints hold.

Before anything loads, :func:`check_before_fit` refuses an adapter folder that would replace the
run's checkpoints or config (or anything deltatune did not write), a new run over an earlier run's
checkpoints (unless resuming or ``overwrite``), ``--ckpt_path last`` when there is no checkpoint, and
a checkpoint that is damaged or was written for another model spec.

Every checkpoint carries a *run record* (:func:`run_record`) under :data:`RECORD`: the resolved
model spec (:func:`run_spec`), the base metrics and samples measured before training, the loss
history and the random-number state. On resume the spec must match (:func:`check_resume` names what
differs), the base metrics are reused rather than measured again on trained weights, and the random
state is restored, so a resumed run continues exactly where the checkpoint was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from deltatune.errors import ConfigError, OutputError
from deltatune.io.adapter import manifest
from deltatune.io.atomic import check_target, recover
from deltatune.model.assembly import ResolvedSpec

RECORD = "deltatune"
"""Key of the run record in a Lightning checkpoint."""
OVERWRITE_HINT = "pass --model.overwrite true to replace it, or --ckpt_path last to resume the run that wrote it"


def run_spec(resolved: ResolvedSpec, optimizer: str) -> dict[str, Any]:
    """What a checkpoint's tensors and optimizer state belong to: base, dtypes, quantizer and delta
    methods with their options, and the optimizer plugin (without plugin versions)."""
    record = manifest(resolved)

    def plugin(entry: dict[str, Any] | None) -> dict[str, Any] | None:
        return {"name": entry["name"], "config": entry["config"]} if entry else None

    return {
        "base": record["base"],
        "base_dtype": record["base_dtype"],
        "trainable_dtype": record["trainable_dtype"],
        "quantizer": plugin(record["quantizer"]),
        "delta": [plugin(d) for d in record["delta"]],
        "optimizer": optimizer,
    }


def differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """``"path: saved in the checkpoint, current now"`` for every leaf where two JSON-like values differ;
    of two plugins with different names, only the name."""
    if isinstance(saved, dict) and isinstance(current, dict):
        if "name" in saved and "name" in current and saved["name"] != current["name"]:
            return differences(saved["name"], current["name"], f"{where}.name")
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in differences(saved.get(key), current.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [line for i, (a, b) in enumerate(zip(saved, current)) for line in differences(a, b, f"{where}[{i}]")]
    return [] if saved == current else [f"{where or 'spec'}: {saved!r} in the checkpoint, {current!r} now"]


def check_resume(checkpoint: dict[str, Any], spec: dict[str, Any], trainable_keys: set[str], source: str) -> None:
    """Raise :class:`ConfigError` unless ``checkpoint`` was written for ``spec`` and holds exactly
    ``trainable_keys``; the message names what differs and the checkpoint ``source``."""
    record = checkpoint.get(RECORD) or {}
    if "spec" in record and (changed := differences(record["spec"], spec)):
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"cannot resume from {source}: it was written for another model spec ({shown}); "
                          "resume with the same model options, or start a new run in another folder")
    keys = set(checkpoint.get("state_dict", {}))
    missing, unexpected = sorted(trainable_keys - keys), sorted(keys - trainable_keys)
    if missing or unexpected:
        raise ConfigError(f"cannot resume from {source}: its tensors do not fit this model "
                          f"(missing {missing[:2]}, unexpected {unexpected[:2]}); resume with the same model options")


def run_record(spec: dict[str, Any], report: Any) -> dict[str, Any]:
    """The record a checkpoint carries: spec, base metrics and samples, loss history, random state."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "spec": spec,
        "base_metrics": report.base_metrics,
        "base_samples": [list(s) for s in report.base_samples],
        "history": {k: [list(p) for p in v] for k, v in report.history.items()},
        "rng": rng,
    }


def restore_report(record: dict[str, Any], report: Any) -> None:
    """Put a checkpoint's base metrics, samples and loss history back into ``report``."""
    report.base_metrics = record.get("base_metrics", {})
    report.base_samples = [tuple(s) for s in record.get("base_samples", [])]
    report.history = {k: [tuple(p) for p in v] for k, v in record.get("history", {}).items()}


def restore_rng(record: dict[str, Any]) -> None:
    """Restore the random state a checkpoint was written with (dropout continues its sequence)."""
    rng = record.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_folder(trainer: L.Trainer) -> Path | None:
    """Where the trainer's checkpoint callback writes (as Lightning resolves it), or ``None``."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.log_dir if trainer.loggers else trainer.default_root_dir) / "checkpoints"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's content (tensors memory-mapped), or a :class:`ConfigError` naming a damaged file."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # a truncated zip, a garbage file: torch raises several types
        raise ConfigError(f"checkpoint {path} is damaged or truncated ({type(exc).__name__}: {exc}); "
                          "resume from another checkpoint (--ckpt_path FILE) or start over") from None


def check_before_fit(trainer: L.Trainer, module: Any, ckpt_path: str | None) -> None:
    """The checks of a ``fit`` (resuming from ``ckpt_path``, if given) on its run folder, before any
    weight loads.

    Raises :class:`ConfigError` for ``--ckpt_path last`` without a checkpoint (naming the folder looked
    in) and for a damaged checkpoint or one of another spec; :class:`OutputError` for an adapter folder
    that would replace the run folder, its checkpoints or config, or something deltatune did not write,
    and for a new run over an earlier run's checkpoints without ``overwrite``.
    """
    folder = checkpoint_folder(trainer)
    if ckpt_path == "last":
        found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder and folder.is_dir() else []
        if not found:
            raise ConfigError(f"--ckpt_path last: no last checkpoint in {folder or 'a run without checkpointing'}; "
                              "check --trainer.default_root_dir (or drop --ckpt_path to start a new run)")
        ckpt_path = str(found[-1])
    if ckpt_path:
        checkpoint = read_checkpoint(Path(ckpt_path))
        module.check_checkpoint(checkpoint, ckpt_path)
    root = Path(trainer.default_root_dir)
    overwrite = bool(module.hparams.get("overwrite", False))
    protected = [root, Path(trainer.log_dir or root) / "config.yaml", *([folder] if folder else [])]
    earlier = sorted(folder.glob("*.ckpt")) if folder and folder.is_dir() and not ckpt_path else []
    if earlier and not overwrite:
        raise OutputError(f"{folder} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier[:3])}); "
                          "resume it with --ckpt_path last, or pass --model.overwrite true to start over")
    adapter = module.adapter_path(root)
    for line in recover(adapter):
        print(line)
    check_target(adapter, overwrite=overwrite or bool(ckpt_path), protected=protected, hint=OVERWRITE_HINT)
    for path in earlier:  # overwrite: the new run's checkpoints replace the earlier run's
        path.unlink()
