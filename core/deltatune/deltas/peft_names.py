"""PEFT tensor naming: the key prefix of a PEFT checkpoint and the checked copy of named tensors
between a PEFT state dict and a model's deltas.
"""

from __future__ import annotations

import torch

from deltatune.errors import ConfigError

PEFT_PREFIX = "base_model.model."
"""Prefix of a PEFT checkpoint's per-module keys (``base_model.model.<module name>.lora_A.weight``)."""


def copy_named_tensors(targets: dict[str, torch.Tensor], source: dict[str, torch.Tensor], owner: str) -> None:
    """Copy ``source[k]`` into ``targets[k]`` for every key of ``targets`` (casting dtype).

    Raises :class:`ConfigError` naming ``owner`` when keys are missing from ``source`` or shapes differ.
    """
    missing = sorted(set(targets) - set(source))
    if missing:
        raise ConfigError(
            f"{owner}: the PEFT adapter lacks {len(missing)} tensor(s) this model needs, e.g. {missing[:3]}; "
            "its target modules or method differ from the configuration"
        )
    for key, target in targets.items():
        value = source[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ConfigError(
                f"{owner}: PEFT tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(target.shape)} "
                "(rank or layer sizes differ)"
            )
        with torch.no_grad():
            target.copy_(value.to(device=target.device, dtype=target.dtype))
