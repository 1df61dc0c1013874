"""Generation for prompts (greedy, or sampled with a seed; optional stop sequences), shared by
``deltatune generate``, evaluators and run reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jinja2 import TemplateError
from torch import nn

from deltatune.errors import ConfigError
from deltatune.model.assembly import compute_context, eval_mode
from deltatune.ui.console import print_warning


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as a user turn in the tokenizer's chat template (unchanged when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def prompt_room(model: nn.Module, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit before ``max_new_tokens`` new ones in the model's positions
    (``None``: the model sets no limit); a :class:`ConfigError` when not even one does."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not positions:
        return None
    if max_new_tokens >= positions:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt: the model has "
                          f"{positions} positions")
    return positions - max_new_tokens


def warn_long_prompts(tokenizer: Any, prompts: list[str], room: int, first: int = 0) -> None:
    """Say, one line per prompt, which prompts lose their start to fit ``room`` tokens."""
    for number, prompt in enumerate(prompts, start=first + 1):
        length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if length > room:
            print_warning(f"prompt {number} has {length} tokens; the model's positions leave room for {room} "
                          f"before the new tokens: its first {length - room} tokens are dropped")


_MARK = "\ue000deltatune-user-turn\ue000"
"""Stand-in user text for reading a chat template's framing of a user turn."""


def user_text(tokenizer: Any, prompt: str) -> str:
    """The text of the last user turn of ``prompt`` as :func:`chat_prompt` framed it with the
    tokenizer's chat template: what opens that turn (system turns, earlier turns, the user header) and
    what follows it (the generation prompt) are cut off. Without a template, or for a prompt the
    template did not frame, ``prompt`` comes back stripped."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt.strip()
    before, _, after = chat_prompt(tokenizer, _MARK).partition(_MARK)
    opening = before
    try:  # what opens a user turn is what a first and a later user turn have in common
        later = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": _MARK}],
            tokenize=False, add_generation_prompt=True).partition(_MARK)[0]
        shared = next((n for n in range(min(len(before), len(later)), 0, -1) if before[-n:] == later[-n:]), 0)
        opening = before[len(before) - shared:]
    except TemplateError:  # a template that takes a single user turn only
        pass
    if after and prompt.endswith(after):
        prompt = prompt[: -len(after)]
    if opening and opening in prompt:
        prompt = prompt.rsplit(opening, 1)[1]
    return prompt.strip()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8, *,
             stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             strip: bool = True) -> list[str]:
    """Completions of already-formatted ``prompts`` (special tokens removed).

    Greedy when ``temperature`` is 0; otherwise sampled at that temperature with nucleus ``top_p``,
    from a generator seeded with ``seed`` (the global random state is left as it was). Each
    completion ends before the first of the ``stop`` strings it contains (generation of a sequence
    stops once it produced one). ``strip`` removes surrounding whitespace; without it only trailing
    whitespace goes (the leading indentation of a code completion is kept). A prompt longer than the
    model's positions leave room for loses its start, with a one-line warning.
    """
    room = prompt_room(model, max_new_tokens)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    if stop:
        sampling.update(stop_strings=list(stop), tokenizer=tokenizer)
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    outputs: list[str] = []
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                if room is not None:
                    warn_long_prompts(tokenizer, chunk, room, start)
                encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                                    truncation=room is not None, max_length=room).to(device)
                with compute_context(model):
                    generated = model.generate(
                        **encoded,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        **sampling,
                    )
                new_tokens = generated[:, encoded["input_ids"].shape[1]:]
                texts = [cut_at_stop(t, stop) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
                outputs += [t.strip() if strip else t.rstrip() for t in texts]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return outputs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the ``stop`` strings it contains."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(ends)] if ends else text
