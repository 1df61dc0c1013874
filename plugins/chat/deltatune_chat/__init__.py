"""Chat data: OpenAI-style ``messages`` (``role``/``content``) and ShareGPT ``conversations``
(``from``/``value``), with system prompts and several turns, rendered with the tokenizer's own chat
template.

The loss covers what the model must learn to say: by default every assistant turn
(``train_on: assistant``), or only the last one (``last``), or every token (``all``). The row is the
whole conversation as the template renders it; each assistant turn is scored from the end of its
inference prompt (what ``add_generation_prompt`` renders for the turns before it) through the
template's end-of-turn token; the template text that follows (a newline in ChatML) carries no loss.
Templates that rewrite earlier turns (Qwen3 renders ``<think>`` only for the last reply, Mistral puts
the system prompt into the last user turn) are placed by rendering each turn with a marker for its
content. A template that marks the assistant's text with ``{% generation %}`` blocks places the loss
on exactly those blocks. An empty reasoning block the template injects can be kept out of the loss
(``train_on_empty_reasoning: false``); ``chat_template_kwargs`` reach the template (training rows and
the prompts evaluators generate from). OpenAI rows may carry ``tools``, ``tool`` turns and assistant
``tool_calls``; a template that does not render them is a one-line error naming the row. Rows keep the
last assistant turn's prompt and reply as ``prompt``/``response`` for evaluators that generate (and the
template variables as ``chat_template_kwargs``, so the run's sample table finds the user's text in the
prompt).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, Field
from transformers.utils.chat_template_utils import render_jinja_template

from deltatune.api import (ChatTemplateOptions, DataError, FileSourceOptions, Row, TruncationStats, encode_records, encode_segments,
                           hookimpl, passthrough)

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}
ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
_MARK = "\ue000deltatune-reply\ue000"
"""Stand-in reply text for finding where a template places an assistant turn's content."""


class ChatConfig(FileSourceOptions, ChatTemplateOptions):
    """Options of the ``chat`` dataset builder: the shared file options, the conversation format,
    which turns carry loss, a default system prompt and the chat template's own options."""

    format: Literal["auto", "openai", "sharegpt"] = Field(
        "auto", description="record format: OpenAI `messages` (role/content), ShareGPT `conversations` (from/value), or "
        "detected per record (auto)")
    train_on: Literal["assistant", "last", "all"] = Field(
        "assistant", description="turns that carry loss: every assistant turn, the last one only, or every token")
    system_prompt: str | None = Field(None, description="system message for conversations that have none")
    train_on_empty_reasoning: bool = Field(
        True, description="whether an empty reasoning block the template puts before a reply carries loss")
    reasoning_tags: tuple[str, str] = Field(("<think>", "</think>"),
                                            description="the tags that open and close a reasoning block")


def tool_calls_of(turn: dict[str, Any], index: int, where: str) -> list[dict[str, Any]]:
    """The OpenAI-format ``tool_calls`` of an assistant turn, arguments parsed to objects."""
    calls = turn["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: turn {index} has 'tool_calls' that is not a non-empty list")
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: turn {index} has a tool call without 'function' {{'name', 'arguments'}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: turn {index}: tool call arguments are not JSON ({error})") from None
        parsed.append({**call, "type": call.get("type", "function"),
                       "function": {"name": function["name"], "arguments": arguments}})
    return parsed


def messages_of(record: dict[str, Any], fmt: str, where: str) -> list[Message]:
    """The conversation of ``record`` as OpenAI-style messages, checked; ``where`` is ``file:line``.
    OpenAI rows may hold ``tool`` turns and assistant turns with ``tool_calls``."""
    if fmt == "auto":
        fmt = "openai" if "messages" in record else "sharegpt" if "conversations" in record else ""
        if not fmt:
            raise DataError(f"{where}: no 'messages' or 'conversations' field (keys: {sorted(record)})")
    key, role_key, text_key = ("messages", "role", "content") if fmt == "openai" else ("conversations", "from", "value")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    roles = ROLES if fmt == "openai" else ROLES[:3]
    messages = []
    for index, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        role = role if fmt == "openai" else SHAREGPT_ROLES.get(role, role)
        if role not in roles:
            raise DataError(f"{where}: turn {index} has role {role!r}; expected one of {roles} "
                            f"({'ShareGPT: ' + ', '.join(SHAREGPT_ROLES) if fmt == 'sharegpt' else 'OpenAI format'})")
        calls = role == "assistant" and fmt == "openai" and turn.get("tool_calls") is not None
        text = turn.get(text_key)
        if not isinstance(text, str) and not (calls and text is None):
            raise DataError(f"{where}: turn {index} has no string '{text_key}'")
        message: Message = {"role": role, "content": text or ""}
        if calls:
            message["tool_calls"] = tool_calls_of(turn, index, where)
        if role == "tool":
            message.update({k: turn[k] for k in ("tool_call_id", "name") if k in turn})
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


class Renderer:
    """The tokenizer's chat template applied to one record's conversation (its tools, the configured
    template variables); a template error or a tool turn the template drops is a :class:`DataError`
    naming ``where``."""

    def __init__(self, tokenizer: Any, cfg: ChatConfig, tools: list[Any] | None, where: str):
        self.tokenizer, self.cfg, self.tools, self.where = tokenizer, cfg, tools, where

    def __call__(self, messages: list[Message], generation_prompt: bool) -> str:
        """The template's text for ``messages``."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt,
                **self.cfg.chat_template_kwargs)
        except TemplateError as error:
            raise DataError(f"{self.where}: the tokenizer's chat template refuses this conversation: {error}") from None

    def generation_spans(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]] | None:
        """The rendering of ``messages`` and the character spans of its ``{% generation %}`` blocks,
        for a template that marks what the assistant writes that way (``None`` for one that does not)."""
        template = self.tokenizer.chat_template
        if not isinstance(template, str) or not GENERATION_BLOCK.search(template):
            return None
        try:
            (text,), (spans,) = render_jinja_template(
                [messages], tools=self.tools, chat_template=template, return_assistant_tokens_mask=True,
                **{**self.tokenizer.special_tokens_map, **self.cfg.chat_template_kwargs})
        except TemplateError as error:
            raise DataError(f"{self.where}: the tokenizer's chat template refuses this conversation: {error}") from None
        return text, [tuple(span) for span in spans]

    def check_tools(self, messages: list[Message], text: str) -> None:
        """Refuse a conversation whose tool calls or tool results the template left out of ``text``."""
        for index, message in enumerate(messages):
            dropped = [c["function"]["name"] for c in message.get("tool_calls", ())
                       if c["function"]["name"] not in text]
            result = message["content"].strip()
            if dropped or (message["role"] == "tool" and result not in text and json.dumps(result) not in text):
                raise DataError(f"{self.where}: the tokenizer's chat template does not render tool "
                                f"{'calls' if dropped else 'results'} (turn {index}); use a model whose template "
                                "supports tools")


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def end_of_turn(tokenizer: Any, render: Renderer, before: list[Message]) -> str:
    """The special token the template closes an assistant turn with (the first one after the reply)."""
    probe = render([*before, {"role": "assistant", "content": _MARK}], False)
    after = probe[probe.index(_MARK) + len(_MARK):]
    found = [(after.find(t), t) for t in tokenizer.all_special_tokens if t and t in after]
    if not found:
        raise DataError(f"{render.where}: the chat template closes an assistant turn with no special token; "
                        "the chat builder cannot tell where a reply ends")
    return min(found)[1]


def written_before_content(render: Renderer, before: list[Message], prompt: str) -> str:
    """What the template puts between a reply's inference ``prompt`` and its content that the model
    writes itself (Mistral's space): the text before the content after the generation prompt, or
    after the last special token when the generation prompt is empty."""
    alone = render([*before, {"role": "assistant", "content": _MARK}], False)
    header = alone[:alone.index(_MARK)]
    generation_prompt = prompt[len(plain):] if prompt.startswith(plain := render(before, False)) else ""
    marks = [generation_prompt] if generation_prompt else render.tokenizer.all_special_tokens
    ends = [header.rfind(m) + len(m) for m in marks if m and m in header]
    return header[max(ends):] if ends else ""


def reply_span(render: Renderer, messages: list[Message], i: int, full: str, cursor: int) -> tuple[int, int]:
    """Where assistant turn ``i`` lies in ``full`` (the whole conversation rendered): from the end of
    the turn's inference prompt through the template's end-of-turn token.

    The inference prompt (the turns before, with the generation prompt) is a prefix of ``full`` for
    templates that render earlier turns unchanged. Templates that rewrite them (Qwen3 drops an earlier
    turn's reasoning block, Mistral moves the system prompt to the last user turn) are located by
    rendering the conversation with the turn's content replaced by a marker: the reply starts where
    that rendering departs from ``full``, less what the model itself writes before the content (e.g.
    Mistral's space, see :func:`written_before_content`)."""
    prompt = render(messages[:i], True)
    if full.startswith(prompt) and len(prompt) >= cursor:
        start = len(prompt)
    else:
        marked_turn = {**messages[i], "content": _MARK}
        start = common_prefix(full, render([*messages[:i], marked_turn, *messages[i + 1:]], False))
        written = written_before_content(render, messages[:i], prompt)
        if written and full[:start].endswith(written):
            start -= len(written)
    eot = end_of_turn(render.tokenizer, render, messages[:i])
    end = full.find(eot, max(start, cursor))
    if start < cursor or end < 0:
        raise DataError(f"{render.where}: the chat builder cannot place assistant turn {i} in the chat "
                        "template's rendering")
    return start, end + len(eot)


def segments_of(render: Renderer, messages: list[Message], cfg: ChatConfig) -> list[tuple[str, bool]]:
    """The rendered conversation cut at assistant turns: ``(text, carries loss)`` in order. The turns
    are the template's ``{% generation %}`` blocks where it has them, else found by :func:`reply_span`."""
    marked = render.generation_spans(messages)
    full = marked[0] if marked else render(messages, False)
    render.check_tools(messages, full)
    turns = marked[1] if marked else [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{render.where}: the chat template's {{% generation %}} blocks mark no assistant text")
    everything = cfg.train_on == "all"
    opening, closing = cfg.reasoning_tags
    empty_reasoning = re.compile(rf"\s*{re.escape(opening)}\s*{re.escape(closing)}\s*")
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for n, turn in enumerate(turns):
        start, end = turn if marked else reply_span(render, messages, turn, full, cursor)
        if not cfg.train_on_empty_reasoning and (skip := empty_reasoning.match(full, start)):
            start = skip.end()
        learn = everything or cfg.train_on == "assistant" or n == len(turns) - 1
        segments += [(full[cursor:start], everything), (full[start:end], learn)]
        cursor = end
    return [s for s in [*segments, (full[cursor:], everything)] if s[0]]


class ChatBuilder:
    """The ``chat`` dataset builder."""

    name: ClassVar[str] = "chat"
    Config: ClassVar[type[BaseModel]] = ChatConfig

    def build(self, cfg: ChatConfig, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split``; ``None`` when no file is configured for it."""
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the chat builder needs a tokenizer with a chat template; this model's has none")

        def encode(record: dict[str, Any], where: str, line: int, stats: TruncationStats) -> Row | None:
            messages = messages_of(record, cfg.format, where)
            if cfg.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            tools = record.get("tools")
            if tools is not None and not isinstance(tools, list):
                raise DataError(f"{where}: 'tools' must be a list of function schemas")
            render = Renderer(tokenizer, cfg, tools, where)
            row = encode_segments(tokenizer, segments_of(render, messages, cfg), cfg.max_length, stats, line)
            if row is not None:
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                row.update(prompt=render(messages[:last], True), response=messages[last]["content"],
                           **passthrough(record), **cfg.rendered_with())
            return row

        return encode_records(self.name, cfg, split, encode)


@hookimpl
def deltatune_register_dataset_builders(register) -> None:
    """Provide ``chat``."""
    register(ChatBuilder)
