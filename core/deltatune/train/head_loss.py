"""The LM head's loss, chunked: summed cross-entropy of ``head(hidden)`` without ever holding more than
one chunk of logits (:class:`LinearCrossEntropy`), in forward or backward. Every path to the loss
ends here — the plain forward of :mod:`deltatune.train.loss` and every fast training forward of
a model family's fast training forward — and ``deltatune estimate`` sizes a chunk with :func:`loss_chunk_rows`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.data.packing import IGNORE_INDEX
from deltatune.deltas.grouped import no_autocast
from deltatune.model.logits import LogitTransform
from deltatune.train.update_in_backward import DeferredGrad, updated_in_backward

LOSS_CHUNK_BYTES = 32 * 2**20
"""Bytes of fp32 logits one chunk of the LM-head cross-entropy may hold (160 rows of a
49k vocabulary): logits exist one chunk at a time, in forward and in backward."""

FUSED_LOSS_CHUNK_BYTES = 8 * 2**20
"""The same budget when a fused optimizer (LOMO, AdaLomo) trains the head, whose point is memory: its
peak is weights plus transients, and the logits chunks are the largest transients but the tied
weight's gradient. Smaller chunks cost a little speed and, with glibc, also keep the heap from
growing: a 32 MiB chunk sits just under malloc's largest mmap threshold, so it comes from the heap,
which keeps it after it is freed. Measured on SmolLM2-135M, LOMO, fp32, 1 x 256 tokens: peak RSS
1,145 MiB instead of 1,222-1,253 MiB."""

HEAD_ROW_STEP = 16
"""The LM head's rows (labelled positions) are padded to a multiple of this, and its chunks are one."""

SHAPE_STEPS = (32, 16)
"""Steps to which a fast training forward rounds up the token rows and the attention width of a batch
(so that its matrix products come in few shapes): at most 31 filler rows per batch, and 15 positions
per attention example. ``deltatune estimate`` rounds the same way."""


def round_up(value: int, step: int) -> int:
    """``value`` rounded up to a multiple of ``step``."""
    return -(-value // step) * step


# -- the LM head and cross-entropy, chunked ----------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weightᵀ + bias, target_i)`` over the rows whose target is not
    ``IGNORE_INDEX`` (-100, as ``F.cross_entropy``; an ignored row gets a zero gradient), without
    ever holding more than one chunk of logits: each chunk's logits are computed, turned into the
    loss *and* into the gradients of ``hidden`` (and ``weight``/``bias`` when they train) at once,
    and freed; backward only scales the stored gradients. Logits are computed in the weight's dtype
    and the softmax in fp32, as ``head(hidden).float()`` followed by ``F.cross_entropy`` does.

    With a :class:`deltatune.train.update_in_backward.DeferredGrad` (a tied head trained by a fused optimizer) the
    weight's gradient is not computed here: backward hands :func:`head_weight_grad` to it, which
    recomputes it when backward reaches the tied embedding.

    A :class:`deltatune.model.logits.LogitTransform` turns each chunk's fp32 head output into the
    model's logits (soft-capping, scaling) before the softmax; its derivative scales the gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, deferred: DeferredGrad | None = None,
                transform: LogitTransform | None = None) -> torch.Tensor:
        with no_autocast(hidden):
            hidden = hidden.to(weight.dtype)
            grad_on = torch.is_grad_enabled() or any(ctx.needs_input_grad[:3])
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and deferred is None
            need_b = bias is not None and ctx.needs_input_grad[2]
            total = hidden.new_zeros((), dtype=torch.float32)
            dh = torch.empty_like(hidden) if need_h else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            for start in range(0, hidden.shape[0], chunk):
                h, (t, ignored) = hidden[start:start + chunk], _ignoring(targets[start:start + chunk])
                logits = F.linear(h, weight, bias).float()
                if transform is not None:
                    raw, logits = logits, transform.apply(logits)
                lse = torch.logsumexp(logits, dim=-1)
                nll = lse - logits.gather(1, t[:, None]).squeeze(1)
                total += (nll.masked_fill_(ignored, 0.0) if ignored is not None else nll).sum()
                if not (grad_on and (need_h or need_w or need_b)):
                    continue
                slope = transform.derivative(raw, logits) if transform is not None else None
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                if ignored is not None:
                    grad[ignored] = 0.0
                if slope is not None:
                    grad.mul_(slope)
                low = grad.to(weight.dtype)
                if need_h:
                    torch.mm(low, weight, out=dh[start:start + chunk])
                if need_w:
                    dw.add_((low.t() @ h).float())
                if need_b:
                    db += grad.sum(0)
        late = (hidden, weight, targets) if deferred is not None and ctx.needs_input_grad[1] else ()
        ctx.save_for_backward(*(g for g in (dh, dw, db) if g is not None), *late)
        ctx.have = (dh is not None, dw is not None, db is not None)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.deferred = deferred if late else None
        ctx.chunk, ctx.bias, ctx.transform = chunk, bias, transform
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        dh, dw, db = (next(saved) if have else None for have in ctx.have)
        scale = grad_total
        if ctx.deferred is not None:  # the weight's gradient is computed where the tied embedding is
            hidden, weight, targets = saved
            ctx.deferred.defer(partial(head_weight_grad, hidden, weight, ctx.bias, targets, ctx.chunk, scale,
                                       ctx.transform))
        return (dh * scale.to(dh.dtype) if dh is not None else None,
                (dw * scale).to(ctx.dtypes[0]) if dw is not None else None,
                (db * scale).to(ctx.dtypes[1]) if db is not None else None, None, None, None, None)


def head_weight_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     chunk: int, scale: torch.Tensor, transform: LogitTransform | None = None) -> torch.Tensor:
    """The gradient of ``scale * LinearCrossEntropy(hidden, weight, bias, targets)`` with respect to
    ``weight``, recomputing the logits chunk by chunk (for a :class:`deltatune.train.update_in_backward.DeferredGrad`).
    It is accumulated in place in the weight's dtype: one weight-sized tensor, no temporary."""
    with no_autocast(hidden):
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        for start in range(0, hidden.shape[0], chunk):
            h, (t, ignored) = hidden[start:start + chunk], _ignoring(targets[start:start + chunk])
            grad = F.linear(h, weight, bias).float()
            slope = None
            if transform is not None:
                raw, grad = grad, transform.apply(grad)
                slope = transform.derivative(raw, grad)
            grad.sub_(grad.amax(dim=-1, keepdim=True)).exp_()  # softmax in place: no logits-sized temporary
            grad.div_(grad.sum(dim=-1, keepdim=True))
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            if ignored is not None:
                grad[ignored] = 0.0
            if slope is not None:
                grad.mul_(slope)
            dw.addmm_(grad.to(weight.dtype).t(), h)
        return dw.mul_(scale.to(dw.dtype))


def _ignoring(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``targets`` with ignored ones (``IGNORE_INDEX``) replaced by 0, and the mask of the ignored
    ones (``None`` when there are none)."""
    ignored = targets == IGNORE_INDEX
    if not bool(ignored.any()):
        return targets, None
    return targets.masked_fill(ignored, 0), ignored


def loss_chunk_rows(vocab: int, budget: int = LOSS_CHUNK_BYTES) -> int:
    """Rows per chunk of :class:`LinearCrossEntropy` for a vocabulary of ``vocab`` tokens, with
    ``budget`` bytes of fp32 logits per chunk: a multiple of :data:`HEAD_ROW_STEP`, at least one."""
    return max(HEAD_ROW_STEP, budget // (4 * max(vocab, 1)) // HEAD_ROW_STEP * HEAD_ROW_STEP)


def head_chunk_rows(head: nn.Module) -> int:
    """Rows per logits chunk for ``head``: :data:`FUSED_LOSS_CHUNK_BYTES` when a fused optimizer
    updates one of its parameters inside backward, :data:`LOSS_CHUNK_BYTES` otherwise."""
    fused = any(updated_in_backward(p) for p in head.parameters())
    return loss_chunk_rows(getattr(head, "out_features", 50_000),
                           FUSED_LOSS_CHUNK_BYTES if fused else LOSS_CHUNK_BYTES)


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              deferred: DeferredGrad | None = None, transform: LogitTransform | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``transform(head(hidden))`` (the model's logits, see
    :func:`deltatune.model.logits.head_plan`) against ``targets`` (every target is labelled),
    chunked; a head that is not a plain ``nn.Linear`` (a delta on it) is called chunk by chunk.
    ``deferred`` (:func:`deltatune.train.update_in_backward.deferred_tied_head`) moves the head weight's gradient to
    the end of backward, where the tied embedding is reached.

    The rows are padded with ignored ones to a multiple of :data:`HEAD_ROW_STEP`, so the head's
    products come in a few shapes only (see :data:`SHAPE_STEPS`)."""
    filler = round_up(len(targets), HEAD_ROW_STEP) - len(targets)
    if filler:
        hidden = F.pad(hidden, (0, 0, 0, filler))
        targets = F.pad(targets, (0, filler), value=IGNORE_INDEX)
    if type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, head_chunk_rows(head), deferred,
                                        transform)
    total = hidden.new_zeros((), dtype=torch.float32)
    chunk = head_chunk_rows(head)
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start:start + chunk]).float()
        if transform is not None:
            logits = transform.apply(logits)
        total = total + F.cross_entropy(logits, targets[start:start + chunk], reduction="sum",
                                        ignore_index=IGNORE_INDEX)
    return total
