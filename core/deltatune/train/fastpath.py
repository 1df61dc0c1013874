"""The fast training path: a Llama-family decoder computed on unpadded tokens, with fused LoRA.

Hugging Face's decoder forward, run on a padded batch under autocast, spends most of a CPU training
step outside the matrix products that do the work: on padding rows, on skinny LoRA products
(``x Aᵀ`` has 16 columns), on autocast re-casting the fp32 adapters at every op, on a chain of
small element-wise kernels per norm and per rotary embedding, and on a CPU bf16 attention kernel
that is slower than three plain batched products for sequences this short. This module computes
the *same function* (``tests/test_fast_paths.py`` checks loss and gradients against the plain
path) with these changes:

1. **Unpadded tokens.** The real tokens of a batch — ``attention_mask == 1``, or every token of
   packed rows — are gathered into one ``(tokens x hidden)`` matrix, and every linear layer, norm
   and activation runs on those rows only. Examples are told apart as Hugging Face does (a new row,
   or ``position_ids`` not increasing by one: packing); only attention needs them, and it runs in
   an ``(examples x longest example)`` layout. Examples without a labelled target are dropped
   before the first layer, and past its attention the last layer computes only the labelled
   positions: nothing else reaches the loss.
2. **Fused low-rank deltas.** Linear layers that read the same input (q/k/v, gate/up) compute
   their LoRA ``A`` products as one product, and their ``B`` products as one with a block-diagonal
   matrix. A hand-written backward computes only the gradients needed — input, ``A``, ``B``, never
   the frozen base weight's, and not even the input's before the first trainable parameter. The
   fp32 ``A``/``B`` (trainable master weights; the optimizer keeps fp32 state) are copied to the
   compute dtype once per optimizer step — when their version counter changes — not at every op.
3. **bf16 without autocast.** Frozen weights are held in bf16 (see
   :func:`deltatune.model.assembly.compute_dtype`); products run in bf16, norms and softmax accumulate in
   fp32 exactly where Hugging Face does.
4. **Hand-written backward** for RMSNorm, rotary embedding + attention and the SiLU gate: fewer
   saved tensors and fewer passes over memory than autograd's chain of small ops.

Anything not recognised is left to the module itself: a linear layer with another delta (DoRA,
VeRA, several deltas), a quantized base, dropout while training, or a forward hook runs its own
``forward`` inside the fast path; an unknown architecture, a hooked norm/attention/MLP, or a batch
whose labelled positions follow padding makes :func:`fast_token_loss` return ``None``, and the
caller uses the plain Hugging Face forward.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from deltatune.train.update_in_backward import DeferredGrad, deferred_tied_head, updated_in_backward
from deltatune.deltas.layers import DeltaLinear, LowRankDelta
from deltatune.data.packing import IGNORE_INDEX

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

SUPPORTED_MODEL_TYPES = ("llama",)

SHAPE_STEPS = (32, 16)
"""Steps to which :class:`TokenLayout` rounds up the token rows and the attention width of a batch
(see there): at most 31 filler rows per batch, and 15 positions per attention example. The number of
examples is not rounded: an extra example costs a whole ``width²`` of attention."""

HEAD_ROW_STEP = 16
"""The LM head's rows (labelled positions) are padded to a multiple of this, and its chunks are one."""


def round_up(value: int, step: int) -> int:
    """``value`` rounded up to a multiple of ``step``."""
    return -(-value // step) * step


def _no_autocast(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``tensor``'s device; a no-op context when it is off already (building a
    ``torch.autocast`` costs about 18 µs, and a step enters this some 480 times)."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


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
    recomputes it when backward reaches the tied embedding."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, deferred: DeferredGrad | None = None) -> torch.Tensor:
        with _no_autocast(hidden):
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
                lse = torch.logsumexp(logits, dim=-1)
                nll = lse - logits.gather(1, t[:, None]).squeeze(1)
                total += (nll.masked_fill_(ignored, 0.0) if ignored is not None else nll).sum()
                if not (grad_on and (need_h or need_w or need_b)):
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                if ignored is not None:
                    grad[ignored] = 0.0
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
        ctx.chunk, ctx.bias = chunk, bias
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        dh, dw, db = (next(saved) if have else None for have in ctx.have)
        scale = grad_total
        if ctx.deferred is not None:  # the weight's gradient is computed where the tied embedding is
            hidden, weight, targets = saved
            ctx.deferred.defer(partial(head_weight_grad, hidden, weight, ctx.bias, targets, ctx.chunk, scale))
        return (dh * scale.to(dh.dtype) if dh is not None else None,
                (dw * scale).to(ctx.dtypes[0]) if dw is not None else None,
                (db * scale).to(ctx.dtypes[1]) if db is not None else None, None, None, None)


def head_weight_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     chunk: int, scale: torch.Tensor) -> torch.Tensor:
    """The gradient of ``scale * LinearCrossEntropy(hidden, weight, bias, targets)`` with respect to
    ``weight``, recomputing the logits chunk by chunk (for a :class:`deltatune.train.update_in_backward.DeferredGrad`).
    It is accumulated in place in the weight's dtype: one weight-sized tensor, no temporary."""
    with _no_autocast(hidden):
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        for start in range(0, hidden.shape[0], chunk):
            h, (t, ignored) = hidden[start:start + chunk], _ignoring(targets[start:start + chunk])
            grad = F.linear(h, weight, bias).float()
            grad.sub_(grad.amax(dim=-1, keepdim=True)).exp_()  # softmax in place: no logits-sized temporary
            grad.div_(grad.sum(dim=-1, keepdim=True))
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            if ignored is not None:
                grad[ignored] = 0.0
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
              deferred: DeferredGrad | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets`` (every target is labelled),
    chunked; a head that is not a plain ``nn.Linear`` (a delta on it) is called chunk by chunk.
    ``deferred`` (:func:`deltatune.train.update_in_backward.deferred_tied_head`) moves the head weight's gradient to
    the end of backward, where the tied embedding is reached.

    The rows are padded with ignored ones to a multiple of :data:`HEAD_ROW_STEP`, so the head's
    products come in a few shapes only (see :class:`TokenLayout`)."""
    filler = round_up(len(targets), HEAD_ROW_STEP) - len(targets)
    if filler:
        hidden = F.pad(hidden, (0, 0, 0, filler))
        targets = F.pad(targets, (0, filler), value=IGNORE_INDEX)
    if type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, head_chunk_rows(head), deferred)
    total = hidden.new_zeros((), dtype=torch.float32)
    chunk = head_chunk_rows(head)
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start:start + chunk]).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk], reduction="sum",
                                        ignore_index=IGNORE_INDEX)
    return total


# -- element-wise pieces with hand-written backward ---------------------------------------------------
class RMSNorm(torch.autograd.Function):
    """Hugging Face's ``LlamaRMSNorm``: ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with _no_autocast(x):
            x32 = x.to(torch.float32, copy=True)
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
            normed = x32.mul_(rstd).to(x.dtype)
            out = weight * normed
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with _no_autocast(x):
            dx = dw = None
            if ctx.needs_input_grad[0]:
                g = (grad * weight).float()
                xhat = x.to(torch.float32, copy=True).mul_(rstd)
                dot = (g * xhat).mean(-1, keepdim=True)
                dx = g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
            if ctx.needs_input_grad[1]:
                normed = (x.float() * rstd).to(x.dtype)
                dw = (grad.float() * normed.float()).sum(0).to(weight.dtype)
        return dx, dw, None


class SiluGate(torch.autograd.Function):
    """``silu(gate) * up`` of a ``(tokens, 2 x intermediate)`` tensor holding ``[gate | up]``.
    Backward recomputes ``silu(gate)`` rather than keeping it (a ``tokens x intermediate`` tensor
    per layer: 1.8 GB for Llama-2-7B at 2 x 1,304 tokens)."""

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        with _no_autocast(gate_up):
            out = F.silu(gate).mul_(up)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        dgate, dup = out.chunk(2, dim=-1)
        with _no_autocast(gate_up):
            torch.mul(grad, F.silu(gate), out=dup)
            torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=dgate)
        return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding of ``x`` (``tokens x heads x head_dim``): ``x cos + rotate_half(x) sin``
    (Hugging Face's ``apply_rotary_pos_emb``); ``inverse`` applies its transpose (the backward)."""
    half = x.shape[-1] // 2
    out = x * cos
    s = -sin if inverse else sin
    out[..., :half].addcmul_(x[..., half:], s[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], s[..., half:])
    return out


@dataclass
class TokenLayout:
    """Where the real tokens of a batch are, and how they form examples.

    ``index`` holds, for each of the ``T`` computed tokens, its position in the flattened
    ``(batch x length)`` input; ``positions`` its rotary position. Attention runs in a padded
    ``(examples x width)`` layout in which real token ``t`` sits at ``slots[t]``.

    ``T`` and ``width`` are rounded up to the steps of :data:`SHAPE_STEPS`: the first ``real``
    tokens are the batch's, the rest are filler rows (the batch's first token again, at position 0,
    with no target and outside every attention example). A filler row reaches neither the loss nor a real row, so its
    gradient is exactly zero and it changes no result; what it buys is a small set of matrix shapes.
    oneDNN builds and caches a kernel ("primitive") per shape, and with the exact token count nearly
    every step brought new shapes: slower steps while they are built, and memory that grew with the
    cache (measured in docs/benchmarks.md).
    """

    index: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    examples: int
    width: int
    targets: torch.Tensor
    """Next-token target of each computed token (-100: none)."""
    count: int
    """Labelled targets (equal to the plain path's count)."""
    real: int
    """How many of the computed tokens are the batch's (the rest are filler rows)."""

    @staticmethod
    def build(batch: dict[str, torch.Tensor]) -> TokenLayout | None:
        """The layout of ``batch``, or ``None`` when a labelled target follows a padding position
        (the plain path would read a padding position's output there)."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        rows, length = input_ids.shape
        device = input_ids.device
        targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1).reshape(-1)
        mask = batch.get("attention_mask")
        if mask is None:
            index = torch.arange(rows * length, device=device)
        else:
            index = mask.reshape(-1).nonzero().squeeze(1)
        flat_targets = targets[index]
        labelled = flat_targets != IGNORE_INDEX
        count = int(labelled.sum())
        if count != int((labels[:, 1:] != IGNORE_INDEX).sum()):
            return None
        position_ids = batch.get("position_ids")
        if position_ids is None:
            positions = index % length
        else:
            positions = position_ids.expand(rows, length).reshape(-1)[index]
        row = torch.div(index, length, rounding_mode="floor")
        starts = torch.ones_like(index, dtype=torch.bool)
        starts[1:] = (row[1:] != row[:-1]) | (positions[1:] != positions[:-1] + 1)
        segment = starts.cumsum(0) - 1
        # only examples with a labelled target are computed: attention never crosses examples
        wanted = torch.zeros(int(segment[-1]) + 1 if len(segment) else 0, dtype=torch.bool, device=device)
        wanted[segment[labelled]] = True
        keep = wanted[segment]
        if not bool(keep.all()):
            index, positions, starts, flat_targets = index[keep], positions[keep], starts[keep], flat_targets[keep]
            segment = starts.cumsum(0) - 1
        lengths = torch.bincount(segment) if len(segment) else segment
        real, (tokens_step, width_step) = len(index), SHAPE_STEPS
        examples = len(lengths)
        width = round_up(int(lengths.max()), width_step) if len(lengths) else 0
        first = torch.cumsum(lengths, 0) - lengths
        offset = torch.arange(real, device=device) - first[segment]
        filler = round_up(real, tokens_step) - real if real else 0
        return TokenLayout(index=F.pad(index, (0, filler)), positions=F.pad(positions, (0, filler)),
                           slots=segment * width + offset, examples=examples, width=width,
                           targets=F.pad(flat_targets, (0, filler), value=IGNORE_INDEX), count=count, real=real)

    def to_examples(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, C)`` token rows → ``(examples * width, C)`` (zeros where an example is shorter; filler
        rows are left out)."""
        out = x.new_zeros((self.examples * self.width, x.shape[1]))
        return out.index_copy_(0, self.slots, x[: self.real])

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(examples * width, C)`` → ``(T, C)`` (zeros in the filler rows)."""
        out = x.new_zeros((len(self.index), x.shape[1]))
        torch.index_select(x, 0, self.slots, out=out[: self.real])
        return out


@lru_cache(maxsize=16)
def causal_bias(group: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive causal mask of one ``(group x width)`` stack of query rows against ``width`` keys:
    0 where a query may attend, ``-inf`` after it (broadcast over the batch of key/value heads).
    Built once per shape (every layer of a step, and most steps, share one); read, never written."""
    future = torch.ones(width, width, dtype=torch.bool, device=device).triu_(1)
    bias = torch.zeros(width, width, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
    return bias.repeat(group, 1)


class Attention(torch.autograd.Function):
    """Rotary embedding and causal grouped-query attention per example, from the fused ``[q | k | v]``
    projections of the tokens to the ``(tokens, heads x head_dim)`` attention output.

    Scores and weighted sums are batched products in the compute dtype (the scaling and the causal
    mask applied by the scores' product itself, ``baddbmm``); the softmax is computed in fp32 (as
    Hugging Face's eager attention) and its backward in one fused pass. Query heads share key/value
    heads without copies: a key/value head's ``group`` query heads are stacked as one
    ``(group x width)`` query matrix.
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout,
                heads: int, kv_heads: int, head_dim: int, scaling: float) -> torch.Tensor:
        tokens = qkv.shape[0]
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        group, S, W = heads // kv_heads, layout.examples, layout.width
        with _no_autocast(qkv):
            qk = rope(qkv[:, :k_end].view(tokens, heads + kv_heads, head_dim), cos, sin)
            qk = layout.to_examples(qk.view(tokens, k_end))
            v = layout.to_examples(qkv[:, k_end:])
            q = qk[:, :q_end].view(S, W, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
            q = q.reshape(S * kv_heads, group * W, head_dim)
            k = qk[:, q_end:].view(S, W, kv_heads, head_dim).transpose(1, 2).reshape(S * kv_heads, W, head_dim)
            v = v.view(S, W, kv_heads, head_dim).transpose(1, 2).reshape(S * kv_heads, W, head_dim)
            scores = torch.baddbmm(causal_bias(group, W, qkv.dtype, qkv.device), q, k.transpose(1, 2), alpha=scaling)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qkv.dtype)
            del scores
            out = torch.bmm(probs, v).view(S, kv_heads, group, W, head_dim).permute(0, 3, 1, 2, 4)
            out = layout.to_tokens(out.reshape(S * W, heads * head_dim))
        ctx.save_for_backward(q, k, v, probs, cos, sin)
        ctx.layout, ctx.shape = layout, (heads, kv_heads, head_dim, scaling)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        q, k, v, probs, cos, sin = ctx.saved_tensors
        layout = ctx.layout
        heads, kv_heads, head_dim, scaling = ctx.shape
        group, S, W = heads // kv_heads, layout.examples, layout.width
        tokens = grad.shape[0]
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        with _no_autocast(grad):
            dout = layout.to_examples(grad.contiguous()).view(S, W, kv_heads, group, head_dim)
            dout = dout.permute(0, 2, 3, 1, 4).reshape(S * kv_heads, group * W, head_dim)
            dv = torch.bmm(probs.transpose(1, 2), dout)
            dprobs = torch.bmm(dout, v.transpose(1, 2))
            # softmax's backward in one pass (accumulating in fp32), then the scaling of the scores
            dscores = torch.ops.aten._softmax_backward_data(dprobs, probs, -1, probs.dtype).mul_(scaling)
            del dprobs
            dq = torch.bmm(dscores, k)
            dk = torch.bmm(dscores.transpose(1, 2), q)
            dqkv = torch.empty((tokens, k_end + kv_heads * head_dim), dtype=grad.dtype, device=grad.device)
            dq = dq.view(S, kv_heads, group, W, head_dim).permute(0, 3, 1, 2, 4).reshape(S * W, q_end)
            dk = dk.view(S, kv_heads, W, head_dim).transpose(1, 2).reshape(S * W, k_end - q_end)
            dv = dv.view(S, kv_heads, W, head_dim).transpose(1, 2).reshape(S * W, k_end - q_end)
            dqk = layout.to_tokens(torch.cat([dq, dk], dim=1)).view(tokens, heads + kv_heads, head_dim)
            dqkv[:, :k_end] = rope(dqk, cos, sin, inverse=True).view(tokens, k_end)
            dqkv[:, k_end:] = layout.to_tokens(dv)
        return dqkv, None, None, None, None, None, None, None


# -- linear layers sharing one input, with their low-rank deltas fused ------------------------------------
def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _only_input_grad_hooks(model: nn.Module, embedding: nn.Module) -> bool:
    """Whether the only hooks on ``embedding`` are the ones Hugging Face's
    ``gradient_checkpointing_enable`` adds (``enable_input_require_grads``: the embedding's output
    requires grad, which re-entrant checkpointing needs). The fast path checkpoints without re-entry,
    so they change nothing it computes."""
    handles = getattr(model, "_require_grads_hooks", None) or []
    ids = {handle.id for handle in handles}
    return (bool(ids) and set(embedding._forward_hooks) <= ids and not embedding._forward_pre_hooks
            and not embedding._backward_hooks and not getattr(embedding, "_backward_pre_hooks", None))


def _frozen_dense(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and not _hooked(module) and not module.weight.requires_grad
            and (module.bias is None or not module.bias.requires_grad))


def _plain_lowrank(delta: nn.Module) -> bool:
    """A LoRA pair whose forward is exactly ``result + s · B A dropout(x)`` with no dropout at work."""
    if not isinstance(delta, LowRankDelta) or type(delta).forward is not LowRankDelta.forward:
        return False
    if type(delta).lowrank is not LowRankDelta.lowrank or _hooked(delta):
        return False
    if isinstance(delta.dropout, nn.Dropout) and delta.training and delta.dropout.p > 0:
        return False
    return all(type(m) is nn.Linear and m.bias is None and not _hooked(m) for m in (delta.lora_A, delta.lora_B))


@dataclass
class Member:
    """One linear layer of a group: a frozen dense base and at most one plain LoRA pair."""

    base: nn.Linear
    delta: LowRankDelta | None

    @staticmethod
    def of(module: nn.Module) -> Member | None:
        if _frozen_dense(module):
            return Member(module, None)
        if type(module) is not DeltaLinear or _hooked(module) or not _frozen_dense(module.base_layer):
            return None
        active = [d for key, d in module.deltas.items() if key not in module.merged]
        if not active:
            return Member(module.base_layer, None)
        if len(active) == 1 and _plain_lowrank(active[0]):
            return Member(module.base_layer, active[0])
        return None


class OptimizerSteps:
    """How many ``torch.optim`` optimizer steps this process has taken (a global step post-hook).

    Part of :class:`LowRankWeights`' cache key beside the version counters: fused optimizer kernels
    (``torch.optim.AdamW(fused=True)``) update parameters in place without bumping their version."""

    count = 0

    @classmethod
    def tick(cls, *_: Any) -> None:
        cls.count += 1


register_optimizer_step_post_hook(OptimizerSteps.tick)


class LowRankWeights:
    """The compute-dtype copies of a group's LoRA pairs — ``A`` stacked (``R x in``) and the scaled
    ``B`` blocks on a block diagonal (``out x R``) — refreshed only when a master weight may have
    changed: an optimizer step was taken or a master's version counter moved.

    The two buffers are allocated once (per dtype and shapes) and refreshed in place, block by
    block; :func:`refresh_lowrank` refreshes every stale group of a model with three ``foreach``
    calls before the first layer. Rebuilding them group by group (a concatenation, a block diagonal
    and two casts per group) took about 19 ms of a 580 ms SmolLM2-135M step, this about 15 ms. A
    graph that saved the buffers and is used again after they were refreshed fails autograd's
    in-place check instead of computing with the new weights."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.shape: tuple | None = None
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    @staticmethod
    def key_of(members: list[Member], dtype: torch.dtype) -> tuple:
        """What the copies depend on: dtype, optimizer steps, each master's storage and version, scalings."""
        deltas = [m.delta for m in members]
        params = [p for d in deltas if d is not None for p in (d.lora_A.weight, d.lora_B.weight)]
        return (dtype, OptimizerSteps.count, *((p.data_ptr(), p._version) for p in params),
                *(d.scaling if d is not None else None for d in deltas))

    def stale(self, members: list[Member], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(destination, master, scaling)`` for every block to copy when the copies are out of date
        (``[]`` when they are current); the buffers are (re)allocated here when their shapes changed.
        The caller copies, then sets :attr:`key` to :meth:`key_of`."""
        if self.key_of(members, dtype) == self.key:
            return []
        deltas = [m.delta for m in members]
        ranks = [d.lora_A.out_features if d is not None else 0 for d in deltas]
        outs = [m.base.out_features for m in members]
        device = next(d.lora_A.weight.device for d in deltas if d is not None)
        shape = (dtype, device, members[0].base.in_features, *ranks, *outs)
        if shape != self.shape:
            self.a = torch.empty((sum(ranks), shape[2]), dtype=dtype, device=device)
            self.b = torch.zeros((sum(outs), sum(ranks)), dtype=dtype, device=device)
            self.shape = shape
        blocks = []
        row = col = 0
        for delta, rank, out in zip(deltas, ranks, outs):
            if delta is not None:
                blocks.append((self.a[col:col + rank], delta.lora_A.weight, 1.0))
                blocks.append((self.b[row:row + out, col:col + rank], delta.lora_B.weight, delta.scaling))
                col += rank
            row += out
        return blocks

    def get(self, members: list[Member], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A stacked, scaled B block diagonal)`` in ``dtype``, refreshed first when out of date."""
        refresh_lowrank([(self, members)], dtype)
        return self.a, self.b


def refresh_lowrank(groups: list[tuple[LowRankWeights, list[Member]]], dtype: torch.dtype) -> None:
    """Bring every out-of-date :class:`LowRankWeights` of ``groups`` up to date with its masters:
    ``A`` cast, ``B`` scaled in fp32 then cast (as ``(B.float() * s).to(dtype)``), all at once."""
    stale = [(cache, members, cache.stale(members, dtype)) for cache, members in groups]
    blocks = [block for _, _, group_blocks in stale for block in group_blocks]
    if not blocks:
        return
    with torch.no_grad():
        plain = [(dst, src) for dst, src, scale in blocks if scale == 1.0 and src.dtype == torch.float32]
        scaled = [(dst, src, scale) for dst, src, scale in blocks if not (scale == 1.0 and src.dtype == torch.float32)]
        if plain:
            torch._foreach_copy_([dst for dst, _ in plain], [src for _, src in plain])
        if scaled:
            products = torch._foreach_mul([src.float() for _, src, _ in scaled], [scale for _, _, scale in scaled])
            torch._foreach_copy_([dst for dst, _, _ in scaled], products)
    for cache, members, group_blocks in stale:
        if group_blocks:
            cache.key = cache.key_of(members, dtype)


class LowRankGroup(torch.autograd.Function):
    """``[x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ]_i`` for linear layers reading the same ``x``, as one
    ``(tokens, Σ out_i)`` tensor. The trainable ``A_i``, ``B_i`` are inputs (fp32 masters are fine:
    their gradients come back in their dtype); the frozen bases get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, members: list[Member], cache: LowRankWeights, *params: torch.Tensor):
        with _no_autocast(x):
            if len(members) == 1:
                out = F.linear(x, members[0].base.weight, members[0].base.bias)
            else:  # each product written into its columns of the group's output: no concatenation
                out = x.new_empty((x.shape[0], sum(m.base.out_features for m in members)))
                start = 0
                for m in members:
                    part, weight = out[:, start:start + m.base.out_features], m.base.weight.t()
                    if m.base.bias is None:
                        torch.mm(x, weight, out=part)
                    else:
                        torch.addmm(m.base.bias, x, weight, out=part)
                    start += m.base.out_features
            a = None
            if params:
                a_w, b_w = cache.get(members, x.dtype)
                a = x @ a_w.t()
                out.addmm_(a, b_w.t())
        ctx.save_for_backward(x, a if a is not None else x.new_empty(0), *((a_w, b_w) if params else ()))
        ctx.members = members
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, a, *lowrank = ctx.saved_tensors
        members: list[Member] = ctx.members
        grad = grad.contiguous()
        dx = None
        grads: list[torch.Tensor | None] = []
        with _no_autocast(grad):
            da = grad @ lowrank[1] if lowrank else None
            if ctx.needs_input_grad[0]:
                start = 0
                for m in members:
                    part = grad[:, start:start + m.base.out_features]
                    dx = part @ m.base.weight if dx is None else dx.addmm_(part, m.base.weight)
                    start += m.base.out_features
                if da is not None:
                    dx.addmm_(da, lowrank[0])
            if lowrank:
                # one fp32 cast per group; each master's gradient is a view of it (its rows of dA,
                # its block of dB), scaled in fp32 as (dB.float() * s) is
                da_w = (da.t() @ x).float()
                db_w = (grad.t() @ a).float()
                deltas = [(m.delta, m.base.out_features) for m in members]
                scalings = {d.scaling for d, _ in deltas if d is not None}
                if len(scalings) == 1:
                    db_w.mul_(scalings.pop())
                out_start = r_start = 0
                for delta, out in deltas:
                    if delta is not None:
                        r_end = r_start + delta.lora_A.out_features
                        db = db_w[out_start:out_start + out, r_start:r_end]
                        if scalings:  # members with different scalings
                            db.mul_(delta.scaling)
                        grads.append(da_w[r_start:r_end].to(delta.lora_A.weight.dtype))
                        grads.append(db.to(delta.lora_B.weight.dtype))
                        r_start = r_end
                    out_start += out
        return (dx, None, None, *grads)


class Group:
    """Linear layers of a decoder layer that read the same input (``q/k/v``, ``gate/up``, or one)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.cache = LowRankWeights()

    def fused_members(self, dtype: torch.dtype) -> list[Member] | None:
        """The members, when every module is a frozen dense base in ``dtype`` with at most one plain
        LoRA pair (the group then runs as one :class:`LowRankGroup`); ``None`` otherwise."""
        members = [Member.of(m) for m in self.modules]
        if all(m is not None and m.base.weight.dtype == dtype for m in members):
            return members
        return None

    def __call__(self, x: torch.Tensor, autocast: tuple[bool, torch.dtype]) -> torch.Tensor:
        members = self.fused_members(x.dtype)
        if members is not None:
            params = [p for m in members if m.delta is not None
                      for p in (m.delta.lora_A.weight, m.delta.lora_B.weight)]
            return LowRankGroup.apply(x, members, self.cache, *params)
        with torch.autocast(x.device.type, dtype=autocast[1], enabled=autocast[0]):
            outs = [m(x) for m in self.modules]
        outs = [o.to(x.dtype) for o in outs]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


# -- the model ---------------------------------------------------------------------------------------------
def _llama_classes() -> tuple[type, ...]:
    from transformers.models.llama import modeling_llama as llama

    return llama.LlamaModel, llama.LlamaDecoderLayer, llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm


class Plan:
    """The pieces of one recognised decoder, checked once and re-checked cheaply at every call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        decoder = model.get_decoder()
        self.decoder = decoder
        self.config = decoder.config
        self.layers = list(decoder.layers[: self.config.num_hidden_layers])
        self.groups = [
            (Group([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]), Group([l.self_attn.o_proj]),
             Group([l.mlp.gate_proj, l.mlp.up_proj]), Group([l.mlp.down_proj]))
            for l in self.layers
        ]
        self.heads = self.config.num_attention_heads
        self.kv_heads = self.config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether ``model`` is a decoder this path computes exactly (checked module by module)."""
        getter = getattr(model, "get_decoder", None)
        config = getattr(model, "config", None)
        if not callable(getter) or config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return False
        try:
            decoder = getter()
        except Exception:  # noqa: BLE001 - an unusual model: use the plain path
            return False
        model_cls, layer_cls, attn_cls, mlp_cls, norm_cls = _llama_classes()
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if type(decoder) is not model_cls or rope != "default" or config.hidden_act != "silu":
            return False
        if getattr(decoder.rotary_emb, "attention_scaling", 1.0) != 1.0:
            return False
        if type(decoder.embed_tokens) is not nn.Embedding or type(decoder.norm) is not norm_cls:
            return False
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        for module in (model, decoder, decoder.norm):
            if _hooked(module):
                return False
        if _hooked(decoder.embed_tokens) and not _only_input_grad_hooks(model, decoder.embed_tokens):
            return False
        for layer in decoder.layers:
            parts = (layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)
            if (type(layer) is not layer_cls or type(layer.self_attn) is not attn_cls or type(layer.mlp) is not mlp_cls
                    or type(layer.input_layernorm) is not norm_cls or type(layer.post_attention_layernorm) is not norm_cls
                    or any(_hooked(p) for p in parts)):
                return False
        return True

    def current(self) -> bool:
        """Whether the model still has the modules this plan was made for."""
        if self.model.get_decoder() is not self.decoder:
            return False
        for layer, (qkv, o, gate_up, down) in zip(self.layers, self.groups):
            attn, mlp = layer.self_attn, layer.mlp
            if (qkv.modules != [attn.q_proj, attn.k_proj, attn.v_proj] or o.modules[0] is not attn.o_proj
                    or gate_up.modules != [mlp.gate_proj, mlp.up_proj] or down.modules[0] is not mlp.down_proj):
                return False
        return True

    def layer(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout,
              autocast: tuple[bool, torch.dtype], rows: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder layer on the token rows ``hidden``; with ``rows``, only those rows' outputs are
        computed (keys and values still come from every row) and returned, in that order."""
        layer = self.layers[index]
        qkv, o, gate_up, down = self.groups[index]
        attn = layer.self_attn
        x = RMSNorm.apply(hidden, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        heads = Attention.apply(qkv(x, autocast), cos, sin, layout, self.heads, self.kv_heads, self.head_dim,
                                attn.scaling)
        if rows is not None:
            hidden, heads = hidden[rows], heads[rows]
        hidden = hidden + o(heads, autocast)
        x = RMSNorm.apply(hidden, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        return hidden + down(SiluGate.apply(gate_up(x, autocast)), autocast)

    def refresh_lowrank(self, dtype: torch.dtype) -> None:
        """Refresh the compute-dtype LoRA copies of every fused group at once (see
        :func:`refresh_lowrank`); a group that will not take the fused path is skipped."""
        groups = []
        for group in (g for layer_groups in self.groups for g in layer_groups):
            members = group.fused_members(dtype)
            if members is not None and any(m.delta is not None for m in members):
                groups.append((group.cache, members))
        refresh_lowrank(groups, dtype)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of ``positions`` (``tokens x 1 x head_dim``), as ``LlamaRotaryEmbedding``."""
        inv_freq = self.decoder.rotary_emb.inv_freq.float()
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def token_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
        """``(summed cross-entropy, labelled tokens)`` of ``batch``, or ``None`` (use the plain path)."""
        embed = self.decoder.embed_tokens
        dtype = embed.weight.dtype
        if not dtype.is_floating_point or self.config.attention_dropout and self.model.training:
            return None
        layout = TokenLayout.build(batch)
        if layout is None:
            return None
        head = self.model.get_output_embeddings()
        if layout.count == 0:
            return embed.weight.new_zeros((), dtype=torch.float32), 0
        device = embed.weight.device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        with torch.autocast(device.type, enabled=False):
            deferred = deferred_tied_head(self.model)  # a tied head trained by LOMO/AdaLomo
            weight = embed.weight if deferred is None else deferred.attach()
            hidden = F.embedding(batch["input_ids"].reshape(-1)[layout.index], weight, embed.padding_idx,
                                 sparse=deferred is not None)
            cos, sin = self.rotary(layout.positions, dtype)
            self.refresh_lowrank(dtype)
            checkpoint = self.decoder.gradient_checkpointing and self.model.training and torch.is_grad_enabled()
            # the last layer computes only the labelled rows past its attention (padded to the head's
            # row step with row 0, whose target is ignored): nothing else reaches the loss
            labelled = (layout.targets != IGNORE_INDEX).nonzero().squeeze(1)
            filler = round_up(len(labelled), HEAD_ROW_STEP) - len(labelled)
            targets = F.pad(layout.targets[labelled], (0, filler), value=IGNORE_INDEX)
            labelled = F.pad(labelled, (0, filler))
            last = len(self.layers) - 1
            for index in range(len(self.layers)):
                rows = labelled if index == last else None
                if checkpoint:
                    hidden = torch.utils.checkpoint.checkpoint(self.layer, index, hidden, cos, sin, layout, autocast,
                                                               rows, use_reentrant=False)
                else:
                    hidden = self.layer(index, hidden, cos, sin, layout, autocast, rows)
            if last < 0:  # a decoder without layers
                hidden = hidden[labelled]
            norm = self.decoder.norm
            hidden = RMSNorm.apply(hidden, norm.weight, norm.variance_epsilon)
            total = head_loss(head, hidden, targets, deferred)
        return total, layout.count


_PLANS: weakref.WeakKeyDictionary[nn.Module, Plan] = weakref.WeakKeyDictionary()


def plan_for(model: nn.Module) -> Plan | None:
    """The fast-path plan of ``model`` (made once, re-checked at every call), or ``None``."""
    plan = _PLANS.get(model)
    if plan is not None and plan.current() and Plan.supports(model):
        return plan
    if not Plan.supports(model):
        _PLANS.pop(model, None)
        return None
    plan = Plan(model)
    _PLANS[model] = plan
    return plan


def fast_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
    """The fast path's ``(summed token loss, labelled tokens)``, or ``None`` when it does not apply."""
    plan = plan_for(model)
    return plan.token_loss(batch) if plan is not None else None
