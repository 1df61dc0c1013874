"""The options every file-reading dataset builder shares, declared once.

A builder that reads one data file per split takes :class:`FileSourceOptions` as the base of its
``Config`` and adds only what is its own (a prompt template, which turns carry loss, ...). The core's
helpers that read such a config (:func:`deltatune.data.module.split_path`,
:func:`deltatune.data.module.encode_records`) rely on exactly these fields. A plugin that renders chat
prompts (a builder or an evaluator) adds :class:`ChatTemplateOptions`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FileSourceOptions(BaseModel):
    """A training file, optional validation and test files, a length cap per row, a row cap per split."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="training file (.jsonl, .json, .csv, .parquet)")
    validation_path: str | None = Field(
        None, description="validation file (without one, the data module holds out part of the training rows)"
    )
    test_path: str | None = Field(None, description="test file")
    max_length: int = Field(512, gt=8, description="tokens per row at most; longer examples are truncated")
    limit: int | None = Field(None, gt=0, description="use at most this many rows per split")


class ChatTemplateOptions(BaseModel):
    """The chat template's own variables, for a plugin that renders chat prompts: a base of its
    ``Config`` next to :class:`FileSourceOptions`."""

    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra variables for the chat template, e.g. {enable_thinking: false} (Qwen3)")

    def rendered_with(self) -> dict[str, Any]:
        """The fields a row rendered with these variables carries (``chat_template_kwargs``, when any)."""
        return {"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {}
