"""Adapters in a trained-like state and the inputs that compare them, for the export and
combination tests (``tests`` is on ``sys.path`` through ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltatune.io.adapter import save_adapter
from deltatune.model.assembly import ModelSpec, ResolvedSpec, build_model, resolve_spec

LORA_ATTN = {"name": "lora", "config": {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
DORA_MLP = {"name": "dora", "config": {"r": 4, "alpha": 8, "targets": ["gate_proj", "up_proj", "down_proj"]}}


def trained_adapter(folder: Path, delta: list, base: str = "tiny-llama",
                    quantizer: dict | None = None) -> tuple[nn.Module, ResolvedSpec]:
    """Build, perturb every trainable tensor (a trained-like state: B is non-zero, the update is a
    fair fraction of the base weights, whose entries are about 0.02) and save to ``folder``."""
    resolved = resolve_spec(ModelSpec(base=base, delta=delta, quantizer=quantizer, base_dtype="fp32"))
    torch.manual_seed(0)  # the methods' own initialisation (LoRA's A) draws from the global generator
    model = build_model(resolved)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * (0.1 if param.ndim == 1 else 0.03))
    model.eval()
    save_adapter(model, resolved, folder)
    return model, resolved


def ids() -> torch.Tensor:
    """A fixed batch of token ids (2 x 23) within the tiny models' vocabulary."""
    return torch.randint(0, 250, (2, 23), generator=torch.Generator().manual_seed(0))
