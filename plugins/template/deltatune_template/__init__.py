"""FLAN-style templates: rows of any fields (JSONL, JSON, CSV or Parquet) become instruction/response
pairs through user-written templates.

Each template is a pair of Python format strings over the row's fields, e.g.
``{prompt: "What is {a} plus {b}?", response: "{answer}"}``. With several templates, each row uses one
drawn at random — reproducibly: the draw depends only on ``seed``, the split and the row's position
in its file, not on the order rows are read or on ``limit``. Missing cells (empty CSV fields) format
as empty text. The prompt becomes a user turn of the tokenizer's chat template (``chat: auto``,
rendered with ``chat_template_kwargs``); the loss covers the response only unless ``train_on_prompt``.
"""

from __future__ import annotations

import random
import string
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltatune.api import (
    ChatMode,
    ChatTemplateOptions,
    DataError,
    FileSourceOptions,
    Row,
    TruncationStats,
    encode_example,
    encode_records,
    hookimpl,
    passthrough,
    user_prompt,
)


class Template(BaseModel):
    """One template: format strings for the prompt and the response."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    response: str = "{answer}"

    @field_validator("prompt", "response")
    @classmethod
    def _parses(cls, value: str) -> str:
        fields = template_fields(value)
        if any(not f.isidentifier() for f in fields):
            raise ValueError(f"template fields must be plain names like {{answer}}, got {sorted(fields)}")
        return value


def template_fields(text: str) -> set[str]:
    """The field names a format string uses (a malformed string raises ``ValueError``)."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


class TemplateConfig(FileSourceOptions, ChatTemplateOptions):
    """Options of the ``template`` dataset builder: the shared file options, the templates and their
    draw, how the prompt is shown, and whether it carries loss."""

    templates: list[Template] = Field(min_length=1, description="prompt/response format strings over the record's "
                                      "fields ({question}); each record draws one")
    seed: int = Field(0, description="seed of the per-record draw of a template")
    chat: ChatMode = Field("auto", description="show the prompt as a user turn of the chat template (chat), as plain "
                           "text (plain), or as a chat turn when the tokenizer has a template (auto)")
    train_on_prompt: bool = Field(False, description="also compute the loss on the prompt tokens")


def fill(template: str, record: dict[str, Any], where: str, index: int) -> str:
    """``template`` formatted with ``record``'s fields (``None`` as empty text)."""
    missing = template_fields(template) - set(record)
    if missing:
        raise DataError(f"{where}: template {index} uses field(s) {sorted(missing)}, which the row lacks "
                        f"(fields: {sorted(record)})")
    return template.format(**{k: "" if v is None else v for k, v in record.items()})


class TemplateBuilder:
    """The ``template`` dataset builder."""

    name: ClassVar[str] = "template"
    Config: ClassVar[type[BaseModel]] = TemplateConfig

    def build(self, cfg: TemplateConfig, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split``; ``None`` when no file is configured for it."""

        def encode(record: dict[str, Any], where: str, line: int, stats: TruncationStats) -> Row | None:
            index = random.Random(f"{cfg.seed}:{split}:{line}").randrange(len(cfg.templates))
            template = cfg.templates[index]
            prompt = fill(template.prompt, record, where, index)
            response = fill(template.response, record, where, index)
            row = encode_example(tokenizer, user_prompt(tokenizer, prompt, cfg.chat, cfg.chat_template_kwargs), response,
                                 cfg.max_length, cfg.train_on_prompt, stats, line)
            if row is not None:
                row.update(passthrough(record), **cfg.rendered_with(), template=index)
            return row

        return encode_records(self.name, cfg, split, encode)


@hookimpl
def deltatune_register_dataset_builders(register) -> None:
    """Provide ``template``."""
    register(TemplateBuilder)
