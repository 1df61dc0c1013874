"""The logit transforms of the first-party families, each with its derivative for the chunked loss."""

from __future__ import annotations

import torch

from deltatune.api import LogitTransform


def soft_cap(cap: float) -> LogitTransform:
    """``cap · tanh(y / cap)`` (Gemma 2/3's final logit soft-capping)."""
    return LogitTransform(f"soft-capping at {cap:g}", lambda y: torch.tanh(y / cap) * cap,
                          lambda y, z: 1 - (z / cap).square())


def divide_by(scale: float) -> LogitTransform:
    """``y / scale`` (Granite's ``logits_scaling``)."""
    return LogitTransform(f"division by {scale:g}", lambda y: y / scale, lambda y, z: torch.full_like(y, 1 / scale))


def multiply_by(scale: float) -> LogitTransform:
    """``y · scale`` (Cohere's ``logit_scale``)."""
    return LogitTransform(f"multiplication by {scale:g}", lambda y: y * scale, lambda y, z: torch.full_like(y, scale))
