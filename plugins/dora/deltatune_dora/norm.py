"""The magnitude/direction arithmetic DoRA applies to a linear layer's weight and to each expert of a 3-D
expert weight alike: every function takes weights as ``... x out x in`` (a leading expert dimension or
none) and works per output row."""

from __future__ import annotations

import torch


@torch.no_grad()
def direction_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                   sq_norm: torch.Tensor) -> torch.Tensor:
    """``n = ||W + s·B A||`` per output row (fp32, no gradient) without forming ``B A``:
    ``n² = ||W||² + rowdot(B, 2s·W Aᵀ + s²·B (A Aᵀ))``; ``a`` is ``... x r x in``, ``b`` ``... x out x r``,
    ``sq_norm`` is ``||W||²`` per row (fp32). ``W Aᵀ`` is computed in ``W``'s dtype, the rest in fp32."""
    w_at = torch.matmul(weight, a.to(weight.dtype).mT).float()  # W Aᵀ: ... x out x r
    a, b = a.float(), b.float()
    product = torch.addmm if w_at.dim() == 2 else torch.baddbmm  # 2s·W Aᵀ + s²·B (A Aᵀ) in one product
    inner = product(w_at, b, torch.matmul(a, a.mT), beta=2 * scaling, alpha=scaling * scaling)
    return torch.linalg.vecdot(b, inner).add_(sq_norm).clamp_min_(0).sqrt_()


@torch.no_grad()
def rescaled(combined: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((m / n) ⊙ combined, n)`` for the fp32 ``combined = W + s·B A``, ``n`` its row norms: DoRA's
    merged weight, and what :func:`unscaled` needs to take the magnitude out again."""
    norm = combined.norm(dim=-1)
    return combined * (magnitude.float() / norm).unsqueeze(-1), norm


@torch.no_grad()
def unscaled(weight: torch.Tensor, norm: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``W' ⊙ n / m``: the merged weight ``W'`` with the magnitude taken out (the inverse of :func:`rescaled`)."""
    return weight * (norm / magnitude.float()).unsqueeze(-1)
