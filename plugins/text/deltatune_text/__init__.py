"""Plain text for continued pre-training: documents are tokenised, each followed by the
end-of-sequence token, concatenated, and cut into rows of ``max_length`` tokens with the loss on every
token (GPT-style; a row may span two documents, separated by EOS).

A ``.txt`` file is one document, or one per blank-line-separated paragraph with
``paragraphs: true``; in JSONL, JSON, CSV or Parquet files each row's ``field`` (default ``text``) is
a document. The last, shorter row is kept unless ``drop_last``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from deltatune.api import DataError, FileSourceOptions, Row, hookimpl, read_records, split_path


class TextConfig(FileSourceOptions):
    """Options of the ``text`` dataset builder: the shared file options (``.txt`` files too, and rows as
    short as two tokens, since a text row has no prompt), the text column, paragraphs, the last row."""

    path: str = Field(description="training file (.txt, .jsonl, .json, .csv, .parquet)")
    field: str = Field("text", description="the text column of record files")
    paragraphs: bool = Field(False, description=".txt: one document per blank-line-separated paragraph")
    max_length: int = Field(512, gt=1, description="tokens per row")
    drop_last: bool = Field(False, description="drop a document's last row when it is shorter than max_length")


def documents(path: Path, cfg: TextConfig) -> Iterator[str]:
    """The documents of ``path``; a record without a string ``field`` names its file and line."""
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        text = path.read_text(encoding="utf-8")
        yield from (p.strip() for p in text.split("\n\n") if p.strip()) if cfg.paragraphs else [text]
        return
    for line, record in read_records(path):
        value = record.get(cfg.field)
        if not isinstance(value, str):
            raise DataError(f"{path}:{line}: field '{cfg.field}' is missing or not a string (keys: {sorted(record)})")
        yield value


class TextBuilder:
    """The ``text`` dataset builder."""

    name: ClassVar[str] = "text"
    Config: ClassVar[type[BaseModel]] = TextConfig

    def build(self, cfg: TextConfig, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split`` (chunks of the concatenated documents); ``None`` when it has no file."""
        path = split_path(cfg, split)
        if path is None:
            return None
        stream: list[int] = []
        for doc in documents(Path(path), cfg):
            stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if cfg.limit and len(stream) >= cfg.limit * cfg.max_length:
                break
        chunks = [stream[i:i + cfg.max_length] for i in range(0, len(stream), cfg.max_length)]
        if chunks and (len(chunks[-1]) < 2 or (cfg.drop_last and len(chunks[-1]) < cfg.max_length)):
            chunks.pop()
        chunks = chunks[: cfg.limit] if cfg.limit else chunks
        return [{"input_ids": c, "labels": list(c)} for c in chunks]


@hookimpl
def deltatune_register_dataset_builders(register) -> None:
    """Provide ``text``."""
    register(TextBuilder)
