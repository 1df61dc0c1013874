"""Target selection: which linear layers of a model a method's ``targets`` name (PEFT's rules:
name suffixes, ``re:`` patterns, ``all-linear`` = every linear layer but the LM head), and the
roles ``attention`` and ``mlp``: the linear layers of the attention blocks and of the feed-forward
blocks, as the model's family says (:func:`target_roles`).

A role word is always a role, never a name suffix: ``mlp`` selects the feed-forward layers, not a
linear layer that happens to be called ``mlp`` (select that one with ``re:(.*\\.)?mlp``). PEFT has no
role words: its ``target_modules: [mlp]`` names the modules called ``mlp`` (in the decoders
transformers ships, a block, which PEFT refuses to adapt); :mod:`deltatune.io.peft` reads such a name
from an adapter as that regular expression.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch import nn

from deltatune.deltas.layer import DeltaLinear, is_linear
from deltatune.deltas.virtual import HOLDER
from deltatune.errors import ConfigError
from deltatune.plugin.families import KIND, claiming_family, installed_families
from deltatune.plugin.protocols import optional_member

TARGET_ROLES: tuple[str, ...] = ("attention", "mlp")
"""The role words ``targets`` accepts; a linear layer in neither role is ``other``."""

OTHER_ROLE = "other"
"""The role of a linear layer that is neither attention nor mlp (the LM head, say)."""

TARGETS_HELP = ("module-name suffixes, 're:REGEX', 'attention' / 'mlp' (the linear layers of the attention or "
                "feed-forward blocks, as the model family places them), or 'all-linear' (every linear layer "
                "but the LM head)")
"""What a delta method's ``targets`` option accepts, for its description."""

_ATTENTION_BLOCK = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_BLOCK = re.compile(r"mlp|ffn|feed_?forward|moe|experts?", re.IGNORECASE)


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


def role_by_path(name: str) -> str:
    """The role of the linear layer ``name`` by the modules above it, nearest first: one whose name
    speaks of attention (``self_attn``, ``attn``, ``attention``, ``self_attention``) makes it
    ``attention``; one that speaks of a feed-forward block (``mlp``, ``feed_forward``, ``ffn``,
    ``block_sparse_moe``, ``experts``) makes it ``mlp``; else ``other``. Fused projections
    (``qkv_proj``, ``query_key_value``, ``c_attn``, ``gate_up_proj``) take the role of their block."""
    for part in reversed(name.split(".")[:-1]):
        if _ATTENTION_BLOCK.search(part):
            return "attention"
        if _MLP_BLOCK.search(part):
            return "mlp"
    return OTHER_ROLE


def generic_target_roles(model: nn.Module) -> dict[str, list[str]]:
    """Role → names of ``model``'s linear layers, placed by :func:`role_by_path` (the default of a
    model family's optional ``target_roles``)."""
    roles: dict[str, list[str]] = {role: [] for role in TARGET_ROLES}
    for name, _ in iter_linear(model):
        role = role_by_path(name)
        if role in roles:
            roles[role].append(name)
    return roles


def target_roles(model: nn.Module, families: list[Any] | None = None) -> dict[str, list[str]]:
    """Every linear layer of ``model`` by role (:data:`TARGET_ROLES`, then ``other``), as the family of
    ``families`` (default: the installed ones) claiming ``model.config.model_type`` places them
    (its optional ``target_roles``), or :func:`generic_target_roles` when none claims it or it does not say.

    Raises :class:`ConfigError` when the family names a role or a layer that does not exist, or puts a
    layer in two roles."""
    family = claiming_family(getattr(model, "config", None), installed_families() if families is None else families)
    own = optional_member(KIND, family, "target_roles") if family is not None else None
    placed = own(model) if own is not None else generic_target_roles(model)
    linear = [name for name, _ in iter_linear(model)]
    named = Counter(name for names in placed.values() for name in set(names))
    wrong = sorted(set(placed) - set(TARGET_ROLES)) + sorted(set(named) - set(linear))
    twice = sorted(name for name, count in named.items() if count > 1)
    if wrong or twice:
        raise ConfigError(f"model family '{family.name}': target_roles names "
                          + (f"{', '.join(wrong)}, neither a role ({', '.join(TARGET_ROLES)}) nor a linear layer of "
                             "the model" if wrong else f"{', '.join(twice)} in two roles"))
    members = {role: set(placed.get(role, ())) for role in TARGET_ROLES}
    roles = {role: [name for name in linear if name in names] for role, names in members.items()}
    return {**roles, OTHER_ROLE: [name for name in linear if name not in named]}


def describe_roles(roles: dict[str, list[str]]) -> str:
    """``attention: q_proj, k_proj; mlp: …; other: lm_head``: the distinct last name parts per role."""
    parts = []
    for role, names in roles.items():
        suffixes = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
        if suffixes:
            parts.append(f"{role}: {', '.join(suffixes[:12])}{', …' if len(suffixes) > 12 else ''}")
    return "; ".join(parts) or "none"


def find_targets(model: nn.Module, targets: list[str] | str, method: str) -> list[str]:
    """Names of the linear layers ``targets`` select (``all-linear``: all but the LM head; a role
    word of :data:`TARGET_ROLES`: the layers of that role, :func:`target_roles`).

    Raises :class:`ConfigError` naming the method and listing the existing module names by role when
    a target matches nothing.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    linear = [name for name, _ in iter_linear(model)]
    if targets == ["all-linear"]:
        heads = output_layer_names(model)
        return [name for name in linear if name not in heads]
    roles: dict[str, list[str]] | None = None
    chosen: list[str] = []
    for target in targets:
        if target in TARGET_ROLES:
            roles = roles or target_roles(model)
            hits = roles[target]
        else:
            try:
                hits = [name for name in linear if target_matches(name, target)]
            except re.error as exc:
                raise ConfigError(f"{method}: target '{target}' is not a valid regular expression ({exc})") from None
        if not hits:
            roles = roles or target_roles(model)
            raise ConfigError(f"{method}: target '{target}' matches no linear module. Linear modules here, by role: "
                              f"{describe_roles(roles)}; e.g. {', '.join(linear[:3])}")
        chosen += [hit for hit in hits if hit not in chosen]
    return chosen
