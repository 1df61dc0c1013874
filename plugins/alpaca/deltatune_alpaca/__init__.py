"""Alpaca-format instruction data: ``instruction``, optional ``input``, ``output``.

Each record becomes a prompt and a response. With ``template: auto`` (the default) the prompt is the
instruction (and input) as a user turn in the tokenizer's chat template when it has one — the format
an instruct model was tuned on, rendered with ``chat_template_kwargs`` — and the classic Alpaca prompt
otherwise. The loss covers the response only unless ``train_on_prompt``. Files are JSON (a list) or
JSONL; ``path`` is the training file and ``validation_path`` / ``test_path`` are optional.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from deltatune.api import (ChatTemplateOptions, DataError, FileSourceOptions, Row, TruncationStats, chat_prompt,
                           encode_example, encode_records, hookimpl, passthrough)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class AlpacaConfig(FileSourceOptions, ChatTemplateOptions):
    """Options of the ``alpaca`` dataset builder: the shared file options, the prompt template, and
    whether the prompt carries loss."""

    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="prompt format: the tokenizer's chat template (chat), the Alpaca prompt (alpaca), or the chat "
        "template when the tokenizer has one (auto)")
    train_on_prompt: bool = Field(False, description="also compute the loss on the prompt tokens")


def format_prompt(record: dict[str, Any], template: str, tokenizer: Any, template_kwargs: dict[str, Any]) -> str:
    """The prompt text for one record under ``template`` (a chat prompt rendered with ``template_kwargs``)."""
    instruction, extra = record["instruction"], record.get("input") or ""
    use_chat = template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        return chat_prompt(tokenizer, f"{instruction}\n\n{extra}" if extra else instruction, template_kwargs)
    return ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if extra else "",
        instruction=instruction,
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )


def check_record(record: dict[str, Any], where: str) -> None:
    """Raise :class:`DataError` naming ``where`` (file:line) when a record lacks or mistypes a field."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: field '{key}' is missing or not a string (keys: {sorted(record)})")
    if not isinstance(record.get("input", ""), (str, type(None))):
        raise DataError(f"{where}: field 'input' must be a string")


class AlpacaBuilder:
    """The ``alpaca`` dataset builder."""

    name: ClassVar[str] = "alpaca"
    Config: ClassVar[type[BaseModel]] = AlpacaConfig
    default: ClassVar[bool] = True  # the dataset builder of a run that names none

    def build(self, cfg: AlpacaConfig, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split``; ``None`` when no file is configured for it."""

        def encode(record: dict[str, Any], where: str, line: int, stats: TruncationStats) -> Row | None:
            check_record(record, where)
            prompt = format_prompt(record, cfg.template, tokenizer, cfg.chat_template_kwargs)
            row = encode_example(tokenizer, prompt, record["output"], cfg.max_length, cfg.train_on_prompt, stats, line)
            if row is not None:
                row.update(passthrough(record), **cfg.rendered_with())
            return row

        return encode_records(self.name, cfg, split, encode)


@hookimpl
def deltatune_register_dataset_builders(register) -> None:
    """Provide ``alpaca``."""
    register(AlpacaBuilder)
