"""Generation for prompts (greedy, or sampled with a seed; optional stop sequences, streaming), shared
by ``deltatune generate``, ``deltatune chat``, evaluators and run reports; chat prompts rendered with
the tokenizer's chat template and its variables (``chat_template_kwargs``, e.g. Qwen3's
``enable_thinking``); :class:`ChatSession` keeps a multi-turn conversation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jinja2 import TemplateError
from torch import nn
from transformers.generation.streamers import BaseStreamer

from deltatune.errors import ConfigError
from deltatune.model.assembly import compute_context, eval_mode
from deltatune.ui.console import print_warning


TemplateKwargs = Mapping[str, Any] | None
"""Extra variables for a chat template (``{"enable_thinking": False}``); ``None``: none."""


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], template_kwargs: TemplateKwargs = None) -> str:
    """``messages`` rendered with the tokenizer's chat template and ``template_kwargs``, ending with the
    generation prompt (the assistant's turn opened)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))


def chat_prompt(tokenizer: Any, text: str, template_kwargs: TemplateKwargs = None) -> str:
    """``text`` as a user turn in the tokenizer's chat template, rendered with ``template_kwargs``
    (unchanged when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, [{"role": "user", "content": text}], template_kwargs)
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


def user_text(tokenizer: Any, prompt: str, template_kwargs: TemplateKwargs = None) -> str:
    """The text of the last user turn of ``prompt`` as :func:`chat_prompt` framed it with the
    tokenizer's chat template and ``template_kwargs`` (those the prompt was rendered with): what opens
    that turn (system turns, earlier turns, the user header) and what follows it (the generation
    prompt) are cut off. Without a template, or for a prompt the template did not frame, ``prompt``
    comes back stripped."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt.strip()
    before, _, after = chat_prompt(tokenizer, _MARK, template_kwargs).partition(_MARK)
    opening = before
    try:  # what opens a user turn is what a first and a later user turn have in common
        later = render_chat(
            tokenizer,
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": _MARK}],
            template_kwargs).partition(_MARK)[0]
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
             stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             strip: bool = True, on_text: Callable[[str], None] | None = None) -> list[str]:
    """Completions of already-formatted ``prompts`` (special tokens removed).

    Greedy when ``temperature`` is 0; otherwise sampled at that temperature from the ``top_k`` most
    likely tokens (0: all of them) within nucleus ``top_p``, from the torch generator seeded with
    ``seed`` once before the first batch (the global random state is left as it was), so the same
    seed and prompts give the same texts. Each completion ends before the first of the ``stop``
    strings it contains (generation of a sequence stops once it produced one). ``strip`` removes
    surrounding whitespace; without it only trailing whitespace goes (the leading indentation of a
    code completion is kept). A prompt longer than the model's positions leave room for loses its
    start, with a one-line warning. ``on_text`` streams a single prompt's completion: it receives the
    new text piece by piece, token by token, while tokens are generated.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got temperature "
                          f"{temperature}, top_p {top_p}, top_k {top_k}")
    if on_text is not None and len(prompts) != 1:
        raise ConfigError(f"streaming generates for one prompt at a time; got {len(prompts)}")
    room = prompt_room(model, max_new_tokens)
    sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
                                if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                                         "top_k": None})
    if on_text is not None:
        sampling["streamer"] = TextCallbackStreamer(tokenizer, on_text)
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


class TextCallbackStreamer(BaseStreamer):
    """A transformers streamer that hands the new text to a callback token by token (the prompt and
    special tokens left out): each piece is what the tokens so far decode to beyond the pieces already
    given, held back while the last token ends inside a multi-byte character."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.given = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Take the next token (transformers first passes the prompt, which is skipped)."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._give(text)

    def end(self) -> None:
        """Give whatever is left when generation stops."""
        self._give(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _give(self, text: str) -> None:
        if len(text) > self.given:
            self.on_text(text[self.given:])
            self.given = len(text)


class ChatSession:
    """A multi-turn conversation with a model: each :meth:`reply` renders every turn so far (the
    ``system`` message first, when given) with the tokenizer's chat template and ``template_kwargs``,
    generates the assistant's answer with ``options`` (keywords of :func:`generate`) and keeps it for
    the next turn. :meth:`reset` forgets every turn but the system message."""

    def __init__(self, model: nn.Module, tokenizer: Any, system: str | None = None,
                 template_kwargs: TemplateKwargs = None, **options: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat needs a tokenizer with a chat template; this model's has none "
                              "(use `deltatune generate --raw` for plain completion)")
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.template_kwargs, self.options = dict(template_kwargs or {}), options
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Start the conversation over (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self, text: str) -> str:
        """The rendered prompt the model would answer if the user said ``text`` next."""
        return render_chat(self.tokenizer, [*self.messages, {"role": "user", "content": text}], self.template_kwargs)

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's answer to the user's ``text`` (streamed to ``on_text`` as it is generated),
        both kept as turns of the conversation."""
        try:
            prompt = self.prompt(text)
        except TemplateError as error:
            raise ConfigError(f"the tokenizer's chat template refuses this conversation: {error}") from None
        answer = generate(self.model, self.tokenizer, [prompt], on_text=on_text, **self.options)[0]
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the ``stop`` strings it contains."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(ends)] if ends else text
