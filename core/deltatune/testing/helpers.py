"""Helpers of the contract kit, also for plugin authors' own tests: isolated plugin managers, sample
batches and rows for the tiny model, logits, losses, the tolerance measures of oracle tests, and
:func:`fast_forward_runs` (did the fast training forward really run?)."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from deltatune.model import loading as models
from deltatune.plugin.manager import PluginManager
from deltatune.plugin.protocols import Row

SAMPLE_TEXTS = (
    "Reverse the order of these words: red fox jumps",
    "What is 17 plus 25? The answer is 42.",
    "Name three colours: red, green and blue.",
    "The quick brown fox jumps over the lazy dog.",
)


def _import(module: ModuleType | str) -> ModuleType:
    return importlib.import_module(module) if isinstance(module, str) else module


def isolated_manager(*modules: ModuleType | str, entry_points_too: bool = True, strict: bool = False) -> PluginManager:
    """A new :class:`PluginManager` (never the process-wide one).

    It loads every installed ``deltatune`` entry point (unless ``entry_points_too`` is false), except
    those that point at one of ``modules``, and then registers ``modules`` in-process (distribution
    ``<in-process>``), so a plugin under development is tested as it is in the working tree.
    """
    loaded = [_import(m) for m in modules]
    names = {m.__name__ for m in loaded}
    manager = PluginManager(strict=strict)
    if entry_points_too:
        own = {ep.name for ep in entry_points(group="deltatune") if ep.value.split(":")[0] in names}
        manager.load_entry_points(deny=own)
    for module in loaded:
        manager.register_module(module)
    return manager


def sample_batch(tokenizer: Any, texts: tuple[str, ...] | list[str] = SAMPLE_TEXTS) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``texts`` (``input_ids``, ``attention_mask``, ``labels`` = the tokens,
    -100 on padding), as the core's collator builds it."""
    from deltatune.data.module import collate

    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return collate(rows, tokenizer.pad_token_id)


def sample_rows(tokenizer: Any) -> list[Row]:
    """Evaluation rows like a dataset builder makes them: masked prompt, ``prompt``/``response``
    text, and ``choices``/``answer_index`` for multiple-choice evaluators."""
    from deltatune.data.module import encode_example
    from deltatune.model.generation import chat_prompt

    examples = [
        ("Reverse the order of these words: red fox jumps", "jumps fox red", ["jumps fox red", "red fox jumps"], 0),
        ("What is 17 plus 25?", "42", ["24", "42"], 1),
        ("Name a primary colour.", "red", ["red", "purple"], 0),
        ("Capital of France?", "Paris", ["Rome", "Paris"], 1),
    ]
    rows = []
    for prompt, response, choices, answer in examples:
        row = encode_example(tokenizer, chat_prompt(tokenizer, prompt), response, 128)
        row.update(choices=choices, answer_index=answer)
        rows.append(row)
    return rows


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` on ``batch`` in eval mode without autograd, under the compute dtype
    the core uses for that model."""
    from deltatune.model.assembly import compute_context, eval_mode

    with eval_mode(model), torch.no_grad(), compute_context(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out.float()


def trained_like(manager: PluginManager, delta: list[dict[str, Any]], base: str = "tiny-llama", scale: float = 0.1,
                 seed: int = 3) -> tuple[nn.Module, Any]:
    """``(model, resolved spec)`` of ``delta`` on ``base`` (fp32), every trainable tensor moved by seeded
    noise of std ``scale`` so that the methods are not at their initialisation."""
    from deltatune.model.assembly import build_model, resolve_spec

    resolved = resolve_spec({"base": base, "base_dtype": "fp32", "delta": delta}, manager)
    model = build_model(resolved)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model, resolved


def text_started(manager: PluginManager, method: str, tokenizer: Any, folder: Path, length: int,
                 text: str = "Sort it") -> nn.Module:
    """``method`` (a virtual-token delta method) on tiny-llama (fp32), its ``length`` virtual tokens
    started from ``text`` (``init: text``; ``tokenizer`` saved into ``folder`` for it)."""
    from deltatune.model.assembly import build_model, resolve_spec

    tokenizer.save_pretrained(folder)
    config = {"num_virtual_tokens": length, "init": "text", "init_text": text, "tokenizer": str(folder)}
    return build_model(resolve_spec({"base": "tiny-llama", "base_dtype": "fp32",
                                     "delta": [{"name": method, "config": config}]}, manager))


def adam_losses(model: nn.Module, input_ids: torch.Tensor, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """Train ``model``'s trainable parameters with Adam for ``steps`` steps on ``input_ids`` (labels the
    same) through the model's own loss; returns the loss of each step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from deltatune.train.loss import mean_loss
    from deltatune.model.assembly import compute_context

    with compute_context(model):
        return mean_loss(model, batch)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms), in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of ``a`` and ``b`` relative to the largest magnitude of
    ``b`` (in fp32): the tolerance measure of oracle tests (logits, weights, gradients)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def max_parameter_difference(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute difference between the parameters of two copies of one model (in fp32):
    whether, and how far, two optimizers moved the same start apart."""
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def token_batches(count: int, seed: int = 0, shape: tuple[int, int] = (2, 16), vocab: int = 200) -> list[torch.Tensor]:
    """``count`` seeded batches of random token ids (``shape``, ids below ``vocab``): the same
    data for an optimizer and its reference."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=generator) for _ in range(count)]


@contextlib.contextmanager
def fast_forward_runs() -> Iterator[list[str]]:
    """Within the block, the model type of every batch a fast training forward computed
    (a model family's, :func:`deltatune.model.families.family_fast_forward`) is appended to the
    yielded list, so a test comparing the fast and the plain path can assert that the fast one really
    ran rather than silently falling back."""
    from deltatune.model import families as fast

    runs: list[str] = []
    find = fast.family_fast_forward

    def counting(model: nn.Module, family: Any) -> Callable[[dict[str, torch.Tensor]], Any] | None:
        forward = find(model, family)
        if forward is None:
            return None

        def run(batch: dict[str, torch.Tensor]) -> Any:
            result = forward(batch)
            if result is not None:
                runs.append(model.config.model_type)
            return result

        return run

    fast.family_fast_forward = counting
    try:
        yield runs
    finally:
        fast.family_fast_forward = find


def through_bytes(state: Any) -> Any:
    """``state`` saved with :func:`torch.save` and loaded back (as a checkpoint would be)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


TINY_FOLDERS: dict[str, str] = {}
"""Overrides (JSON) → the folder holding that tiny base, for this session."""


def tiny_base_folder(factory: pytest.TempPathFactory, overrides: dict[str, Any]) -> str:
    """A Hugging Face folder holding ``tiny_llama(**overrides)`` and the tiny tokenizer (once per session)."""
    key = json.dumps(overrides, sort_keys=True)
    if key not in TINY_FOLDERS or not Path(TINY_FOLDERS[key], "config.json").is_file():
        folder = factory.mktemp("tiny-base")
        models.tiny_llama(**overrides).save_pretrained(folder, safe_serialization=True)
        models.tiny_tokenizer().save_pretrained(folder)
        TINY_FOLDERS[key] = str(folder)
    return TINY_FOLDERS[key]
