"""The decoder's forward pass without the LM head, shared by the training loss and evaluators."""

from __future__ import annotations

import torch
from torch import nn


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden states of ``model`` (a Hugging Face causal LM) for ``batch``."""
    decoder = model.get_decoder()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return decoder(**kwargs, use_cache=False).last_hidden_state
