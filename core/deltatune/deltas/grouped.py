"""Grouped products: linear layers that read the same input (q/k/v, gate/up) computed as one product.

A fast training forward (a model family's) hands each such set of layers to a
:class:`ProjectionGroup`. When every layer is a frozen dense base with at most one active delta, and
the deltas' class provides a :class:`GroupedProduct` (:attr:`deltatune.deltas.layer.Delta.grouped_product`)
that accepts them, the group runs as that one product, with the delta method's own hand-written
backward; a group without deltas runs as :class:`BaseProducts`. Anything else — a quantized or trained
base, several deltas on a layer, a delta the product does not accept (dropout at work, say), a hook —
runs each layer's own ``forward`` under the caller's autocast. ``deltatune estimate`` asks the same
products what they keep (:meth:`GroupedProduct.kept_per_token`, :meth:`GroupedProduct.compute_copies`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.deltas.layer import Delta, DeltaLinear


def no_autocast(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``tensor``'s device; a no-op context when it is off already (building a
    ``torch.autocast`` costs about 18 µs, and a step enters this hundreds of times)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks (a hand-written computation would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def frozen_dense(module: nn.Module) -> bool:
    """Whether ``module`` is a plain, unhooked ``nn.Linear`` whose weight and bias do not train."""
    return (type(module) is nn.Linear and not hooked(module) and not module.weight.requires_grad
            and (module.bias is None or not module.bias.requires_grad))


@dataclass
class Projection:
    """One linear layer of a group: a frozen dense base and at most one active delta."""

    base: nn.Linear
    delta: Delta | None

    @staticmethod
    def of(module: nn.Module) -> Projection | None:
        """``module`` as a projection, or ``None`` when it is not a frozen dense base with at most one
        active (unmerged) delta."""
        if frozen_dense(module):
            return Projection(module, None)
        if type(module) is not DeltaLinear or hooked(module) or not frozen_dense(module.base_layer):
            return None
        active = [d for key, d in module.deltas.items() if key not in module.merged]
        if len(active) > 1:
            return None
        return Projection(module.base_layer, active[0] if active else None)


class GroupedProduct:
    """How projections that read one input are computed as one ``(tokens, Σ out_i)`` product.

    A delta class names its subclass in :attr:`~deltatune.deltas.layer.Delta.grouped_product`. Each
    :class:`ProjectionGroup` holds one instance per product class, for what it keeps between calls
    (compute-dtype copies of trained weights, say); the class-level members answer for a group
    without an instance (:meth:`refresh` for all of a model's groups at once, the memory terms for
    ``deltatune estimate``)."""

    @classmethod
    def accepts(cls, delta: Delta) -> bool:
        """Whether this product computes exactly what ``delta``'s own forward computes (no dropout at
        work, no overridden forward, ...)."""
        return False

    def __call__(self, x: torch.Tensor, projections: list[Projection]) -> torch.Tensor:
        """``[base_i(x) + delta_i(x)]_i`` as one ``(tokens, Σ out_i)`` tensor, in ``x``'s dtype."""
        raise NotImplementedError

    @classmethod
    def refresh(cls, groups: list[tuple[GroupedProduct, list[Projection]]], dtype: torch.dtype) -> None:
        """Bring what the products of ``groups`` keep between calls up to date, all at once, before a
        forward's first layer. Default: they keep nothing."""

    @classmethod
    def kept_per_token(cls, projections: list[Projection]) -> int:
        """Elements per token that backward keeps besides the group's input (for ``deltatune estimate``)."""
        return 0

    @classmethod
    def compute_copies(cls, projections: list[Projection]) -> int:
        """Elements held in the compute dtype between steps (for ``deltatune estimate``)."""
        return 0


def base_products(x: torch.Tensor, projections: list[Projection]) -> torch.Tensor:
    """``[x W_iᵀ + b_i]_i`` of the frozen bases, each product written into its columns of the group's
    output (no concatenation)."""
    if len(projections) == 1:
        return F.linear(x, projections[0].base.weight, projections[0].base.bias)
    out = x.new_empty((x.shape[0], sum(p.base.out_features for p in projections)))
    start = 0
    for p in projections:
        part, weight = out[:, start:start + p.base.out_features], p.base.weight.t()
        if p.base.bias is None:
            torch.mm(x, weight, out=part)
        else:
            torch.addmm(p.base.bias, x, weight, out=part)
        start += p.base.out_features
    return out


def base_input_grad(grad: torch.Tensor, projections: list[Projection]) -> torch.Tensor:
    """``Σ_i grad_i W_i``: the gradient of the group's input through the frozen bases (``grad`` holds
    the columns of every projection)."""
    dx = None
    start = 0
    for p in projections:
        part = grad[:, start:start + p.base.out_features]
        dx = part @ p.base.weight if dx is None else dx.addmm_(part, p.base.weight)
        start += p.base.out_features
    return dx


class _BaseProducts(torch.autograd.Function):
    """:func:`base_products`, with a backward that computes the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projections: list[Projection]) -> torch.Tensor:
        with no_autocast(x):
            out = base_products(x, projections)
        ctx.projections = projections
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        with no_autocast(grad):
            return base_input_grad(grad.contiguous(), ctx.projections), None


class BaseProducts(GroupedProduct):
    """A group of frozen dense bases without deltas."""

    def __call__(self, x: torch.Tensor, projections: list[Projection]) -> torch.Tensor:
        return _BaseProducts.apply(x, projections)


def grouped_product_class(projections: list[Projection]) -> type[GroupedProduct] | None:
    """The product that computes ``projections`` as one: :class:`BaseProducts` without deltas, the
    deltas' own when they share one that accepts each of them, ``None`` otherwise."""
    deltas = [p.delta for p in projections if p.delta is not None]
    if not deltas:
        return BaseProducts
    kinds = {type(d).grouped_product for d in deltas}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is None or any(hooked(d) or not kind.accepts(d) for d in deltas):
        return None
    return kind


class ProjectionGroup:
    """Linear layers of a decoder layer that read the same input (``q/k/v``, ``gate/up``, or one)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.products: dict[type[GroupedProduct], GroupedProduct] = {}

    def grouped(self, dtype: torch.dtype) -> tuple[GroupedProduct, list[Projection]] | None:
        """``(product, projections)`` when the group runs as one grouped product with bases in
        ``dtype``; ``None`` when each layer runs its own forward."""
        projections = [Projection.of(m) for m in self.modules]
        if not all(p is not None and p.base.weight.dtype == dtype for p in projections):
            return None
        kind = grouped_product_class(projections)
        if kind is None:
            return None
        product = self.products.get(kind)
        if product is None:
            product = self.products[kind] = kind()
        return product, projections

    def __call__(self, x: torch.Tensor, autocast: tuple[bool, torch.dtype]) -> torch.Tensor:
        """The layers' outputs side by side (``tokens x Σ out``), in ``x``'s dtype."""
        grouped = self.grouped(x.dtype)
        if grouped is not None:
            product, projections = grouped
            return product(x, projections)
        with torch.autocast(x.device.type, dtype=autocast[1], enabled=autocast[0]):
            outs = [m(x) for m in self.modules]
        outs = [o.to(x.dtype) for o in outs]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def refresh_groups(groups: Iterable[ProjectionGroup], dtype: torch.dtype) -> None:
    """Let each product class refresh what it keeps, for all of its groups at once (see
    :meth:`GroupedProduct.refresh`); a group that will not run as a grouped product is skipped."""
    by_kind: dict[type[GroupedProduct], list[tuple[GroupedProduct, list[Projection]]]] = {}
    for group in groups:
        grouped = group.grouped(dtype)
        if grouped is not None:
            by_kind.setdefault(type(grouped[0]), []).append(grouped)
    for kind, items in by_kind.items():
        kind.refresh(items, dtype)
