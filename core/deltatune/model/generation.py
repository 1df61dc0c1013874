"""Greedy generation for prompts, shared by ``deltatune generate``, evaluators and run reports."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.model.assembly import compute_context


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as a user turn in the tokenizer's chat template (unchanged when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy completions of already-formatted ``prompts`` (special tokens stripped)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with compute_context(model):
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
