"""Fast training forwards: the seam through which the loss asks for "a faster forward of this model".

A fast training forward computes the same ``(summed token loss, labelled tokens)`` as the plain Hugging
Face forward of :func:`deltatune.train.loss.token_loss`, faster, for the models it recognises. A
*finder* is registered per ``config.model_type`` (:func:`register_fast_forward`): given a model, it
returns that model's forward, or ``None`` when it does not compute the model exactly (a hooked module,
an unknown rope type ...). The forward returns ``None`` for a batch it does not take, and the loss then
uses the plain path. A model with virtual tokens (:mod:`deltatune.deltas.virtual`) has no fast forward. A finder given as ``"module:function"`` is imported only when a model of its type
asks, so the plain path of other models never imports it.

The Llama family's forward (:mod:`deltatune.train.fast.llama`) is registered here; its kernels
(:mod:`~deltatune.train.fast.kernels`) and token layout (:mod:`~deltatune.train.fast.tokens`) are
for any Llama-like decoder. Linear layers that read one input run as the grouped products their deltas
provide (:mod:`deltatune.deltas.grouped`).

May import: :mod:`deltatune.train.head_loss`, :mod:`deltatune.train.update_in_backward`, and the layers below
``train`` (never :mod:`deltatune.train.loss`, which imports this package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from deltatune.deltas.virtual import virtual_tokens

FastForward = Callable[[dict[str, torch.Tensor]], "tuple[torch.Tensor, int] | None"]
"""A model's fast training forward: ``batch -> (summed token loss, labelled tokens)``, or ``None``
when it does not take this batch."""

FastForwardFinder = Callable[[nn.Module], "FastForward | None"]
"""``model -> its fast training forward``, or ``None`` when the finder does not compute it exactly."""

_FINDERS: dict[str, FastForwardFinder | str] = {"llama": "deltatune.train.fast.llama:fast_forward_for"}


def register_fast_forward(model_type: str, finder: FastForwardFinder | str) -> None:
    """Make ``finder`` (a callable, or ``"module:function"`` imported on first use) the fast-forward
    finder of models whose ``config.model_type`` is ``model_type``, replacing any earlier one."""
    _FINDERS[model_type] = finder


def fast_forward(model: nn.Module) -> FastForward | None:
    """The fast training forward of ``model``, or ``None`` (the plain forward applies)."""
    if virtual_tokens(model) is not None:  # virtual tokens change the attention inputs: the exact generic path
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    finder = _FINDERS.get(model_type) if isinstance(model_type, str) else None
    if finder is None:
        return None
    if isinstance(finder, str):
        module, _, name = finder.partition(":")
        finder = _FINDERS[model_type] = getattr(importlib.import_module(module), name)
    return finder(model)
