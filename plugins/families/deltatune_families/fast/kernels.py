"""Pieces of a Llama-like decoder layer with hand-written backward, on unpadded token rows: RMSNorm,
the SiLU gate, rotary embedding and causal grouped-query attention. Each computes what Hugging Face's
module computes (dtype for dtype), with fewer saved tensors and fewer passes over memory than
autograd's chain of small ops.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from deltatune.api import no_autocast
from deltatune_families.fast.tokens import TokenLayout


class RMSNorm(torch.autograd.Function):
    """Hugging Face's ``LlamaRMSNorm``: ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with no_autocast(x):
            x32 = x.to(torch.float32, copy=True)
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
            normed = x32.mul_(rstd).to(x.dtype)
            out = weight * normed
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        with no_autocast(x):
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
        with no_autocast(gate_up):
            out = F.silu(gate).mul_(up)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        dgate, dup = out.chunk(2, dim=-1)
        with no_autocast(gate_up):
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


@lru_cache(maxsize=16)
def causal_bias(group: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive causal mask of one ``(group x width)`` stack of query rows against ``width`` keys:
    0 where a query may attend, ``-inf`` after it (broadcast over the batch of key/value heads).
    Built once per shape (every layer of a step, and most steps, share one); read, never written.
    On the CPU only widths below :data:`FLASH_MIN_WIDTH` build one."""
    future = torch.ones(width, width, dtype=torch.bool, device=device).triu_(1)
    bias = torch.zeros(width, width, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
    return bias.repeat(group, 1)


FLASH_MIN_WIDTH = 256
"""Attention examples at least this wide (:attr:`TokenLayout.width`) on the CPU take the flash kernel
of :class:`Attention`; narrower ones (and tensors on other devices) the score matrices. The crossover
of the two on the CPU is measured by ``benchmarks/long_rows.py --attention`` (see docs/benchmarks.md);
tests lower it so tiny rows take the flash branch."""


def _scores_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """Causal attention of ``q`` (``S x W x heads x D``) on ``k``, ``v`` (``S x W x kv_heads x D``)
    through whole score matrices: ``(S x W, heads x D)`` output and what backward needs."""
    S, W, heads, D = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q.view(S, W, kv_heads, group, D).permute(0, 2, 3, 1, 4).reshape(S * kv_heads, group * W, D)
    k = k.transpose(1, 2).reshape(S * kv_heads, W, D)
    v = v.transpose(1, 2).reshape(S * kv_heads, W, D)
    scores = torch.baddbmm(causal_bias(group, W, q.dtype, q.device), q, k.transpose(1, 2), alpha=scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    del scores
    out = torch.bmm(probs, v).view(S, kv_heads, group, W, D).permute(0, 3, 1, 2, 4).reshape(S * W, heads * D)
    return out, (q, k, v, probs)


def _scores_backward(dout: torch.Tensor, saved: tuple[torch.Tensor, ...], scaling: float):
    """Gradients of :func:`_scores_forward`'s ``q``, ``k``, ``v`` as ``(S x W, heads or kv_heads x D)``
    rows, from ``dout`` (``S x W x heads x D``)."""
    q, k, v, probs = saved
    S, W, heads, D = dout.shape
    kv_heads = k.shape[0] // S
    group = heads // kv_heads
    dout = dout.view(S, W, kv_heads, group, D).permute(0, 2, 3, 1, 4).reshape(S * kv_heads, group * W, D)
    dv = torch.bmm(probs.transpose(1, 2), dout)
    dprobs = torch.bmm(dout, v.transpose(1, 2))
    # softmax's backward in one pass (accumulating in fp32), then the scaling of the scores
    dscores = torch.ops.aten._softmax_backward_data(dprobs, probs, -1, probs.dtype).mul_(scaling)
    del dprobs
    dq = torch.bmm(dscores, k).view(S, kv_heads, group, W, D).permute(0, 3, 1, 2, 4).reshape(S * W, heads * D)
    dk = torch.bmm(dscores.transpose(1, 2), q)
    return dq, _kv_rows(dk, S), _kv_rows(dv, S)


def _kv_rows(x: torch.Tensor, S: int) -> torch.Tensor:
    """``(S x kv_heads, W, D)`` → ``(S x W, kv_heads x D)``."""
    n, W, D = x.shape
    return x.view(S, n // S, W, D).transpose(1, 2).reshape(S * W, n // S * D)


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """The same attention by torch's CPU flash kernel (blocks of keys, running softmax in fp32; key/value
    heads shared by their query heads inside it): nothing ``W x W`` is kept, only the output and the
    log-sum-exp of each query's scores."""
    S, W, heads, D = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scaling)
    return out.transpose(1, 2).reshape(S * W, heads * D), (q, k, v, out, lse)


def _flash_backward(dout: torch.Tensor, saved: tuple[torch.Tensor, ...], scaling: float):
    """Gradients of :func:`_flash_forward`, as :func:`_scores_backward` returns them."""
    q, k, v, out, lse = saved
    S, W, heads, D = dout.shape
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q, k, v, out, lse, 0.0, True, scale=scaling)
    return (dq.transpose(1, 2).reshape(S * W, heads * D), dk.transpose(1, 2).reshape(S * W, -1),
            dv.transpose(1, 2).reshape(S * W, -1))


class Attention(torch.autograd.Function):
    """Rotary embedding and causal grouped-query attention per example, from the side-by-side ``[q | k | v]``
    projections of the tokens to the ``(tokens, heads x head_dim)`` attention output.

    Two computations of the same function, chosen by the examples' width:

    * narrower than :data:`FLASH_MIN_WIDTH`: scores and weighted sums are batched products in the
      compute dtype (the scaling and the causal mask applied by the scores' product itself,
      ``baddbmm``); the softmax is computed in fp32 (as Hugging Face's eager attention) and its
      backward in one fused pass. Query heads share key/value heads without copies: a key/value head's
      ``group`` query heads are stacked as one ``(group x width)`` query matrix. Its memory grows with
      the square of the width (the probabilities are kept for backward), and so does its time.
    * wider, on the CPU: torch's CPU flash-attention kernel and its backward (the kernel of Hugging
      Face's ``sdpa`` attention on the CPU), which keeps memory linear in the width. On other devices
      every width takes the score matrices.

    In fp32 both give the plain path's result to float rounding; in bf16 the flash kernel does not
    round the scores to bf16 before the softmax (the eager attention does; ``sdpa`` does not).
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: TokenLayout,
                heads: int, kv_heads: int, head_dim: int, scaling: float) -> torch.Tensor:
        tokens = qkv.shape[0]
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        S, W = layout.examples, layout.width
        flash = W >= FLASH_MIN_WIDTH and qkv.device.type == "cpu"
        with no_autocast(qkv):
            qk = rope(qkv[:, :k_end].view(tokens, heads + kv_heads, head_dim), cos, sin)
            qk = layout.to_examples(qk.view(tokens, k_end))
            v = layout.to_examples(qkv[:, k_end:]).view(S, W, kv_heads, head_dim)
            q, k = qk[:, :q_end].view(S, W, heads, head_dim), qk[:, q_end:].view(S, W, kv_heads, head_dim)
            out, saved = (_flash_forward if flash else _scores_forward)(q, k, v, scaling)
            out = layout.to_tokens(out)
        ctx.save_for_backward(cos, sin, *saved)
        ctx.layout, ctx.shape, ctx.flash = layout, (heads, kv_heads, head_dim, scaling), flash
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        cos, sin, *saved = ctx.saved_tensors
        layout = ctx.layout
        heads, kv_heads, head_dim, scaling = ctx.shape
        S, W = layout.examples, layout.width
        tokens = grad.shape[0]
        k_end = (heads + kv_heads) * head_dim
        with no_autocast(grad):
            dout = layout.to_examples(grad.contiguous()).view(S, W, heads, head_dim)
            dq, dk, dv = (_flash_backward if ctx.flash else _scores_backward)(dout, saved, scaling)
            dqkv = torch.empty((tokens, k_end + kv_heads * head_dim), dtype=grad.dtype, device=grad.device)
            dqk = layout.to_tokens(torch.cat([dq, dk], dim=1)).view(tokens, heads + kv_heads, head_dim)
            dqkv[:, :k_end] = rope(dqk, cos, sin, inverse=True).view(tokens, k_end)
            dqkv[:, k_end:] = layout.to_tokens(dv)
        return dqkv, None, None, None, None, None, None, None
