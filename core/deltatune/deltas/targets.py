"""Target selection: which linear layers of a model a method's ``targets`` name (PEFT's rules:
name suffixes, ``re:`` patterns, ``all-linear`` = every linear layer but the LM head).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from deltatune.deltas.layer import DeltaLinear, is_linear
from deltatune.deltas.virtual import HOLDER
from deltatune.errors import ConfigError


def iter_linear(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear layer, seeing wrapped layers as one (the linear layers
    inside deltas, such as LoRA's ``lora_A``, or inside virtual tokens' encoders, are not model layers
    and are left out)."""
    for name, module in model.named_modules():
        if ".deltas." in f".{name}." or f".{HOLDER}." in f".{name}.":
            continue
        if isinstance(module, DeltaLinear) or (is_linear(module) and not name.endswith(".base_layer")):
            yield name, module


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output (LM head) layers, which ``all-linear`` leaves out as PEFT does."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def target_matches(name: str, target: str) -> bool:
    """PEFT-style matching: ``q_proj`` matches any module whose name ends in ``.q_proj``;
    ``re:PATTERN`` is a regular expression matched against the whole module name."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str] | str, method: str) -> list[str]:
    """Names of the linear layers ``targets`` select (``all-linear``: all but the LM head).

    Raises :class:`ConfigError` naming the method and listing existing module names when a target
    matches nothing.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    linear = [name for name, _ in iter_linear(model)]
    if targets == ["all-linear"]:
        heads = output_layer_names(model)
        return [name for name in linear if name not in heads]
    chosen: list[str] = []
    for target in targets:
        try:
            hits = [name for name in linear if target_matches(name, target)]
        except re.error as exc:
            raise ConfigError(f"{method}: target '{target}' is not a valid regular expression ({exc})") from None
        if not hits:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise ConfigError(
                f"{method}: target '{target}' matches no linear module. Linear modules here end in: "
                f"{', '.join(suffixes[:12])}; e.g. {', '.join(linear[:3])}"
            )
        chosen += [hit for hit in hits if hit not in chosen]
    return chosen
