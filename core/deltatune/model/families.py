"""Which model-family plugin serves a model: the seam between the core and what one family of causal
decoders needs (its logit transform, its fast training forward).

A model-family plugin (:class:`deltatune.plugin.protocols.ModelFamily`) names the ``config.model_type``
values it serves and says, per config, what it does not handle exactly. :func:`serving_family` picks
the family for a config; a config no family claims, or one its family does not handle, gets no
family, and the loss takes the generic path (:mod:`deltatune.model.logits`: checked against the
model's own logits, exact for every causal LM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.deltas.virtual import virtual_tokens
from deltatune.plugin.families import KIND, claiming_family, installed_families
from deltatune.plugin.protocols import optional_member

__all__ = ["KIND", "FastForward", "family_fast_forward", "installed_families", "serving_family"]


def serving_family(config: Any, families: list[Any]) -> tuple[Any | None, str]:
    """``(family, "")`` for the family of ``families`` serving ``config``; ``(None, why)`` when the
    family claiming its model type does not handle it exactly; ``(None, "")`` when none claims it.

    Raises :class:`ConfigError` when two families claim the model type (naming both)."""
    family = claiming_family(config, families)
    if family is None:
        return None, ""
    reason = family.unhandled(config)
    if reason:
        return None, f"the {family.name} model family does not handle it exactly ({reason})"
    return family, ""


FastForward = Callable[[dict[str, torch.Tensor]], "tuple[torch.Tensor, int] | None"]
"""A model's fast training forward: ``batch -> (summed token loss, labelled tokens)``, or ``None``
when it does not take this batch."""


def family_fast_forward(model: nn.Module, family: Any) -> FastForward | None:
    """The fast training forward ``family`` (the family serving ``model``, or ``None``) provides for
    ``model``, or ``None``: the plain path applies. A model with virtual tokens
    (:mod:`deltatune.deltas.virtual`) has none: they change the attention inputs, so the exact generic path runs."""
    if virtual_tokens(model) is not None:
        return None
    make = optional_member(KIND, family, "fast_forward") if family is not None else None
    return make(model) if make is not None else None
