"""Instruction data: encoding examples, reading data files, and the Lightning data module.

Builders (plugins) turn files into rows with :func:`encode_example` (a prompt and a response) or
:func:`encode_segments` (a conversation), reading records with :func:`read_records` (JSON/JSONL here,
CSV/Parquet through Hugging Face ``datasets``) or :func:`encode_records`, so every builder names a bad
record by file and line and reports truncation the same way. The data module mixes several builders
(:mod:`deltatune.data.mixing`), holds out a validation split when a builder has none, builds the
``extra_eval`` sets, and batches training rows plainly, length-grouped or packed
(:mod:`deltatune.data.packing`).
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader

from deltatune.ui import console
from deltatune.plugin.resolve import PluginRef, ResolvedPlugin, coerce_ref, default_name, format_validation_error, resolve
from deltatune.errors import ConfigError, DataError, check_option
from deltatune.model.generation import TemplateKwargs, chat_prompt
from deltatune.data.mixing import DatasetSpec, mix_rows
from deltatune.data.order import ResumableLoader, ShuffledRows
from deltatune.model.loading import DEFAULT_MODEL, load_tokenizer
from deltatune.plugin.manager import get_plugin_manager
from deltatune.data.packing import IGNORE_INDEX, LengthGroupedBatches, collate, collate_packed, describe_batches, pack_rows
from deltatune.plugin.protocols import Row

SPLITS = ("train", "validation", "test")


@dataclass
class TruncationStats:
    """How many examples lost prompt or response tokens to ``max_length``, or were dropped."""

    examples: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    dropped: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the run log."""
        return (
            f"{self.examples} examples: {self.prompts_cut} prompts and {self.responses_cut} responses "
            f"truncated, {self.dropped} dropped (no response token fits)"
        )


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    train_on_prompt: bool = False,
    stats: TruncationStats | None = None,
    line: int | None = None,
) -> Row | None:
    """Tokenise ``prompt`` + ``response`` + EOS into a training row.

    The loss covers the response (and EOS) only, unless ``train_on_prompt``. When the pair exceeds
    ``max_length``, the prompt loses tokens from its start first (keeping at least half the budget),
    then the response from its end. A row whose response would vanish entirely is dropped
    (``None``) and counted in ``stats`` — never silently.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if stats is not None:
        stats.examples += 1
    if len(prompt_ids) + len(response_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
        if keep_prompt < len(prompt_ids):
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
            if stats is not None:
                stats.prompts_cut += 1
        room = max_length - len(prompt_ids)
        if room <= 0:
            if stats is not None:
                stats.dropped += 1
                if line is not None:
                    stats.dropped_lines.append(line)
            return None
        if room < len(response_ids):
            response_ids = response_ids[:room]
            if stats is not None:
                stats.responses_cut += 1
    labels = (prompt_ids if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)) + response_ids
    return {"input_ids": prompt_ids + response_ids, "labels": labels, "prompt": prompt, "response": response}


def encode_segments(
    tokenizer: Any,
    segments: list[tuple[str, bool]],
    max_length: int,
    stats: TruncationStats | None = None,
    line: int | None = None,
) -> Row | None:
    """Tokenise text segments in order into one training row; a segment flagged ``True`` carries loss.

    Each segment is tokenised on its own (as a prompt is at inference), so segment boundaries are
    token boundaries. A row longer than ``max_length`` keeps its first ``max_length`` tokens (counted
    as a cut response when labelled tokens were lost, else as a cut prompt); a row left with no
    labelled token is dropped (``None``) and counted.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, train in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids += ids
        labels += ids if train else [IGNORE_INDEX] * len(ids)
    if stats is not None:
        stats.examples += 1
    if len(input_ids) > max_length:
        lost_labels = any(t != IGNORE_INDEX for t in labels[max_length:])
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if stats is not None:
            stats.responses_cut += lost_labels
            stats.prompts_cut += not lost_labels
    if all(t == IGNORE_INDEX for t in labels[1:]):
        if stats is not None:
            stats.dropped += 1
            if line is not None:
                stats.dropped_lines.append(line)
        return None
    return {"input_ids": input_ids, "labels": labels}


ChatMode = Literal["auto", "chat", "plain"]
"""How a builder shows a prompt to the model: ``chat`` as a user turn of the tokenizer's chat template,
``plain`` as raw text, ``auto`` chat when the tokenizer has a template."""


def user_prompt(tokenizer: Any, text: str, mode: ChatMode = "auto", template_kwargs: TemplateKwargs = None) -> str:
    """``text`` as the model should see it under ``mode`` (see :data:`ChatMode`), a chat prompt
    rendered with ``template_kwargs``."""
    if mode == "chat" or (mode == "auto" and getattr(tokenizer, "chat_template", None)):
        return chat_prompt(tokenizer, text, template_kwargs)
    return text


def split_path(cfg: Any, split: str) -> str | None:
    """The file a builder config names for ``split`` (``path``, ``validation_path``, ``test_path``)."""
    return {"train": cfg.path, "validation": cfg.validation_path, "test": cfg.test_path}[split]


RecordEncoder = Callable[[dict[str, Any], str, int, TruncationStats], "Row | None"]
"""``encode(record, where, line, stats)``: one record of a data file as a row (``None``: dropped);
``where`` is ``"file:line"`` for error messages."""


def encode_records(builder: str, cfg: Any, split: str, encode: RecordEncoder) -> list[Row] | None:
    """The rows of ``split`` for a builder whose config has ``path``/``validation_path``/``test_path``
    and ``limit``: every record of the split's file through ``encode``, truncation reported once.
    ``None`` when the config names no file for ``split``."""
    path = split_path(cfg, split)
    if path is None:
        return None
    rows: list[Row] = []
    stats = TruncationStats()
    for line, record in read_records(Path(path)):
        row = encode(record, f"{path}:{line}", line, stats)
        if row is not None:
            rows.append(row)
        if cfg.limit and len(rows) >= cfg.limit:
            break
    if stats.prompts_cut or stats.responses_cut or stats.dropped:
        print(f"{builder} {split} ({path}): {stats.summary()}")
    return rows


PASSTHROUGH = ("choices", "answer_index", "family")
"""Record fields a builder copies onto its rows for evaluators."""


def passthrough(record: dict[str, Any]) -> dict[str, Any]:
    """The :data:`PASSTHROUGH` fields present in ``record``."""
    return {k: record[k] for k in PASSTHROUGH if record.get(k) is not None}


def decode_line(raw: bytes, path: Path, number: int) -> str:
    """Line ``number`` of ``path`` as text; bytes that are not UTF-8 are a :class:`DataError` naming
    the file, the line and the column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at column "
                        f"{exc.start + 1}); save the file as UTF-8") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line (a ``.gz`` file is read decompressed); a
    malformed line is a :class:`DataError` naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            text = decode_line(raw, path, number)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(position, record)`` for each record of a ``.jsonl`` (or ``.jsonl.gz``), ``.json`` (a list of
    objects), ``.csv`` or ``.parquet`` file.

    JSON and JSONL are read line by line here, so a malformed line is a :class:`DataError` naming the
    file and the line. CSV and Parquet go through Hugging Face ``datasets`` (converted to Arrow once
    and cached under ``$DELTATUNE_HOME/datasets``); the position is the file line for CSV (the header
    is line 1) and the 1-based row for Parquet. Missing CSV cells are ``None``.
    """
    path = Path(path)
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        yield from read_jsonl(path)
        return
    if path.suffix in TABLE_FORMATS:
        yield from read_table(path)
        return
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        number = raw.count(b"\n", 0, exc.start) + 1
        decode_line(raw[raw.rfind(b"\n", 0, exc.start) + 1:].split(b"\n", 1)[0], path, number)
        raise
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    for index, value in enumerate(data):
        if not isinstance(value, dict):
            raise DataError(f"{path}: item {index} is a {type(value).__name__}, expected an object")
        yield index, value


TABLE_FORMATS = {".csv": ("csv", 2), ".parquet": ("parquet", 1)}
"""Suffix → (``datasets`` loader, position of the first record)."""


def read_table(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a CSV or Parquet file through Hugging Face ``datasets`` (cached as Arrow)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    import datasets

    from deltatune.model.loading import home

    loader, first = TABLE_FORMATS[path.suffix]
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(loader, data_files=str(path.resolve()), split="train",
                                      cache_dir=str(home() / "datasets"))
    except Exception as exc:  # datasets wraps parser errors in several exception types
        cause = exc.__cause__ or exc
        raise DataError(f"{path}: cannot be read as {loader} ({type(cause).__name__}: {cause})") from None
    for index, record in enumerate(table):
        yield index + first, record


def split_off(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministically hold out ``fraction`` of ``rows``: ``(kept, held_out)``."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(rows) * fraction)) if fraction > 0 and len(rows) > 1 else 0
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


BuilderArg = PluginRef | str | list[DatasetSpec]
"""``data.builder``: one builder reference, or a weighted mix of several."""
EvalSource = str | PluginRef
"""An ``extra_eval`` set: a builder reference (its ``path`` rows), or a file path read with the main
builder and its options (less its other file paths and its ``limit``)."""


def resolve_sources(builder: BuilderArg) -> list[tuple[ResolvedPlugin, float]]:
    """Every dataset of ``builder`` resolved and validated, with its weight."""
    if isinstance(builder, list):
        if not builder:
            raise ConfigError("data.builder is an empty list; give at least one dataset builder")
        specs = []
        for entry in builder:
            try:
                specs.append(entry if isinstance(entry, DatasetSpec) else DatasetSpec.model_validate(entry))
            except ValidationError as exc:
                name = entry.get("name", "?") if isinstance(entry, dict) else str(entry)
                raise ConfigError(format_validation_error("dataset_builder", name, exc)) from None
        return [(resolve("dataset_builder", PluginRef(name=s.name, config=s.config)), s.weight) for s in specs]
    return [(resolve("dataset_builder", coerce_ref(builder)), 1.0)]


def resolve_eval_source(name: str, source: EvalSource, main: ResolvedPlugin) -> ResolvedPlugin:
    """The builder of the ``extra_eval`` set ``name``; a path reuses the main builder and its options
    (all but ``validation_path``, ``test_path`` and ``limit``)."""
    if name in SPLITS:
        raise ConfigError(f"extra_eval '{name}' clashes with a split name; choose another name")
    if not isinstance(source, str) or source in get_plugin_manager().names("dataset_builder"):
        return resolve("dataset_builder", coerce_ref(source))
    fields = main.info.cls.Config.model_fields
    if "path" not in fields:
        raise ConfigError(f"extra_eval '{name}': dataset builder '{main.name}' has no 'path' option; "
                          "give a builder reference ({name: ..., config: {...}}) instead of a path")
    config = {**main.ref.config, "path": source}
    for key in ("validation_path", "test_path", "limit"):
        config.pop(key, None)
    return resolve("dataset_builder", PluginRef(name=main.name, config=config))


def build_source(source: ResolvedPlugin, tokenizer: Any, val_fraction: float, seed: int) -> dict[str, list[Row]]:
    """Every split of one dataset; validation held out of train when the builder has none."""
    built = {split: source.plugin.build(source.cfg, tokenizer, split) for split in SPLITS}
    train = built["train"] or []
    if not train:
        raise DataError(f"dataset builder '{source.name}' produced no training rows")
    if built["validation"] is None:
        train, built["validation"] = split_off(train, val_fraction, seed)
    return {"train": train, "validation": built["validation"] or [], "test": built["test"] or []}


class InstructionDataModule(L.LightningDataModule):
    """Rows from one or several dataset-builder plugins, batched for training and evaluation."""

    def __init__(
        self,
        builder: BuilderArg | None = None,
        base: str = DEFAULT_MODEL,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        packing: bool = False,
        pack_length: int = 512,
        group_by_length: bool = False,
        mix_size: int | None = None,
        extra_eval: dict[str, EvalSource] | None = None,
    ) -> None:
        """Every builder is validated at once (before any model is loaded); ``base`` gives the tokenizer.

        Args:
            builder: a dataset builder reference, or a list of them with weights (a mix); none: the
                installed builder that declares itself the default.
            base: the base model whose tokenizer encodes the data.
            batch_size: training rows per batch (packed rows when ``packing``).
            eval_batch_size: rows per validation/test batch.
            val_fraction: share of training rows held out when a builder has no validation split.
            seed: seed of shuffling, mixing, held-out validation and length grouping.
            num_workers: DataLoader worker processes.
            trust_remote_code: allow a local model folder's own tokenizer code.
            packing: pack several training examples per row (no attention or position leakage).
            pack_length: token length of a packed row.
            group_by_length: batch training rows of similar length together (less padding).
            mix_size: training rows of a mix (default: the sum of the datasets' training rows).
            extra_eval: named evaluation sets besides validation and test (e.g. held-out task families).
        """
        super().__init__()
        check_option("data.batch_size", batch_size, batch_size >= 1, "must be at least 1")
        check_option("data.eval_batch_size", eval_batch_size, eval_batch_size >= 1, "must be at least 1")
        check_option("data.val_fraction", val_fraction, 0 <= val_fraction < 1, "must be in [0, 1)")
        check_option("data.num_workers", num_workers, num_workers >= 0, "must be 0 or more")
        check_option("data.pack_length", pack_length, pack_length >= 2, "must be at least 2")
        check_option("data.mix_size", mix_size, mix_size is None or mix_size >= 1, "must be at least 1")
        self.sources = resolve_sources(builder if builder is not None else default_name("dataset_builder"))
        self.builder: ResolvedPlugin = self.sources[0][0]
        self.extra_sources = {name: resolve_eval_source(name, src, self.builder)
                              for name, src in (extra_eval or {}).items()}
        if packing and group_by_length:
            raise ConfigError("packing and group_by_length exclude each other: packed rows are already full")
        self.base = base
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.trust_remote_code = trust_remote_code
        self.packing = packing
        self.pack_length = pack_length
        self.group_by_length = group_by_length
        self.mix_size = mix_size
        self.tokenizer: Any = None
        self.splits: dict[str, list[Row]] = {}
        self.train_batches: list[Row] = []

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and build every split (and extra evaluation set) once."""
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.base, self.trust_remote_code)
        parts = [build_source(source, self.tokenizer, self.val_fraction, self.seed) for source, _ in self.sources]
        if len(parts) == 1:
            train = parts[0]["train"]
        else:
            train = mix_rows([p["train"] for p in parts], [w for _, w in self.sources], self.seed, self.mix_size)
            console.print_mix([(s.name, w, len(p["train"])) for (s, w), p in zip(self.sources, parts)], train)
        self.splits = {
            "train": train,
            "validation": [r for p in parts for r in p["validation"]],
            "test": [r for p in parts for r in p["test"]],
        }
        for name, source in self.extra_sources.items():
            self.splits[name] = source.plugin.build(source.cfg, self.tokenizer, "train") or []
        if self.packing:
            order = list(train)
            random.Random(self.seed).shuffle(order)
            self.train_batches = pack_rows(order, self.pack_length)
        else:
            self.train_batches = train

    def rows(self, split: str) -> list[Row]:
        """The tokenised rows of ``split`` or of an ``extra_eval`` set (after :meth:`setup`)."""
        return self.splits.get(split, [])

    def eval_splits(self) -> list[str]:
        """Names of the evaluation sets that have rows: validation, test, then the ``extra_eval`` sets."""
        return [s for s in ("validation", "test", *self.extra_sources) if self.rows(s)]

    def _train_order(self) -> LengthGroupedBatches | ShuffledRows:
        if self.group_by_length:
            return LengthGroupedBatches([len(r["input_ids"]) for r in self.train_batches], self.batch_size, self.seed)
        return ShuffledRows(len(self.train_batches), self.batch_size, self.seed)

    def batch_stats(self) -> dict[str, Any]:
        """Shape of one training epoch: rows, batches, tokens, padding fraction, examples per row."""
        stats = describe_batches(self.train_batches, self._train_order().batches(0))
        stats["examples"] = len(self.rows("train"))
        return stats

    def _loader(self, rows: list[Row], batch_size: int) -> DataLoader:
        collate_fn = partial(collate, pad_id=self.tokenizer.pad_token_id)
        return DataLoader(rows, batch_size=batch_size, collate_fn=collate_fn, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Training batches (packed, length-grouped or plain) in an order that is a function of the seed
        and the epoch; the position inside an epoch is saved in checkpoints (:mod:`deltatune.data.order`)."""
        collate_fn = partial(collate_packed if self.packing else collate, pad_id=self.tokenizer.pad_token_id)
        order = self._train_order()
        # the loader's own generator seeds its workers, so iterating never draws from the global random state
        common = {"collate_fn": collate_fn, "num_workers": self.num_workers,
                  "generator": torch.Generator().manual_seed(self.seed)}
        if isinstance(order, LengthGroupedBatches):
            return ResumableLoader(self.train_batches, batch_sampler=order, **common)
        return ResumableLoader(self.train_batches, batch_size=self.batch_size, sampler=order, **common)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        return self._loader(self.rows("validation"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order (falls back to validation when there is no test split)."""
        return self._loader(self.rows("test") or self.rows("validation"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()
