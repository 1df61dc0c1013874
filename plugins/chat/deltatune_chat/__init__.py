"""Chat data: OpenAI-style ``messages`` (``role``/``content``) and ShareGPT ``conversations``
(``from``/``value``), with system prompts and several turns, rendered with the tokenizer's own chat
template.

The loss covers what the model must learn to say: by default every assistant turn
(``train_on: assistant``), or only the last one (``last``), or every token (``all``). Each assistant
turn is scored through its end-of-turn token; the template text that follows it (a newline in
ChatML) carries no loss. The rendering is split at turn boundaries — the prompt before an assistant
turn is exactly what ``add_generation_prompt`` renders at inference — so a template that is not
prefix-stable is refused with a clear error. Rows keep the last assistant turn's prompt and reply as
``prompt``/``response`` for evaluators that generate.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from deltatune.api import (DataError, FileSourceOptions, Row, TruncationStats, encode_records, encode_segments,
                           hookimpl, passthrough)

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}
ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ChatConfig(FileSourceOptions):
    """Options of the ``chat`` dataset builder: the shared file options, the conversation format,
    which turns carry loss, and a default system prompt."""

    format: Literal["auto", "openai", "sharegpt"] = "auto"
    train_on: Literal["assistant", "last", "all"] = "assistant"
    system_prompt: str | None = Field(None, description="system message for conversations that have none")


def messages_of(record: dict[str, Any], fmt: str, where: str) -> list[Message]:
    """The conversation of ``record`` as OpenAI-style messages, checked; ``where`` is ``file:line``."""
    if fmt == "auto":
        fmt = "openai" if "messages" in record else "sharegpt" if "conversations" in record else ""
        if not fmt:
            raise DataError(f"{where}: no 'messages' or 'conversations' field (keys: {sorted(record)})")
    key, role_key, text_key = ("messages", "role", "content") if fmt == "openai" else ("conversations", "from", "value")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    messages = []
    for index, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        role = role if fmt == "openai" else SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            raise DataError(f"{where}: turn {index} has role {role!r}; expected one of {ROLES} "
                            f"({'ShareGPT: ' + ', '.join(SHAREGPT_ROLES) if fmt == 'sharegpt' else 'OpenAI format'})")
        if not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: turn {index} has no string '{text_key}'")
        messages.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    """The chat template's text for ``messages``."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments_of(tokenizer: Any, messages: list[Message], train_on: str, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut at assistant turns: ``(text, carries loss)`` in order."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    segments: list[tuple[str, bool]] = []
    covered = ""
    for i in assistant:
        prompt, full = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(covered) and full.startswith(prompt)):
            raise DataError(f"{where}: the tokenizer's chat template does not render turn {i} as an extension "
                            "of the turns before it; the chat builder cannot place the loss")
        reply = full[len(prompt):]
        end = reply.find(tokenizer.eos_token, len(messages[i]["content"]))
        end = len(reply) if end < 0 else end + len(tokenizer.eos_token)
        learn = train_on != "last" or i == assistant[-1]
        segments += [(prompt[len(covered):], train_on == "all"), (reply[:end], learn), (reply[end:], train_on == "all")]
        covered = full
    tail = render(tokenizer, messages, False)[len(covered):]
    return [s for s in [*segments, (tail, train_on == "all")] if s[0]]


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
            row = encode_segments(tokenizer, segments_of(tokenizer, messages, cfg.train_on, where),
                                  cfg.max_length, stats, line)
            if row is not None:
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                row.update(prompt=render(tokenizer, messages[:last], True), response=messages[last]["content"],
                           **passthrough(record))
            return row

        return encode_records(self.name, cfg, split, encode)


@hookimpl
def deltatune_register_dataset_builders(register) -> None:
    """Provide ``chat``."""
    register(ChatBuilder)
