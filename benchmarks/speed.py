"""Training speed on the CPU: deltatune against PEFT + ``transformers.Trainer``, same model, data and steps.

Every configuration trains SmolLM2-135M-Instruct (``deltatune.model.loading.load_base``) on the bundled
instruction suite (``examples/data/tasks-train.jsonl``, tokenised once by the ``alpaca`` builder:
chat-template prompt, loss on the response) for the same steps on the *same batches*: one seeded
order of the examples, cut into batches of ``--batch-size``; the supervised tokens per step are
therefore identical. LoRA is r=16, alpha=32, every linear layer but the LM head, no dropout; AdamW at
a constant learning rate, gradient norm clipped to 1.0, in every configuration.

* ``deltatune``: the Lightning ``DeltaTuneModule`` trained by ``lightning.Trainer`` (its real
  ``training_step``, so the fast path of :mod:`deltatune_families.fast.llama` and the bf16 base of
  :func:`deltatune.model.assembly.compute_dtype` are what a run gets), batches from deltatune's collator.
* ``peft-bf16`` / ``peft-fp32``: ``peft.get_peft_model`` on the fp32 model and ``transformers.Trainer``
  with ``bf16=True`` (autocast) / in fp32, batches padded by ``DataCollatorForSeq2Seq``.
* DoRA, QLoRA (NF4 base) and LOMO (full fine-tuning, update fused into backward) rows, each beside
  its PEFT/Trainer peer where one is installed.

With ``--family`` the model is instead a random-weight model of that family's config with SmolLM2-135M's
sizes (:func:`family_base`; same tokenizer and data): the same step on another family's layers.

Each configuration runs in its own subprocess (peak memory is that process's ``VmHWM``: over the
whole process, and over training alone after a reset before the first step), alternating between
configurations over ``--rounds``; the table shows the median over rounds. Timing starts after the
first ``--warmup`` steps and includes data loading and the optimizer. Model FLOPs utilisation (MFU)
counts only the arithmetic a step cannot avoid on the real, unpadded tokens — frozen linear layers
forward and input-gradient (4 FLOPs per weight per token), trained weights forward, input- and
weight-gradient (6), causal attention (12·heads·head_dim per query-key pair per layer), the LM head
only at labelled positions (4·vocab·hidden, or 6 when it trains) — against a bf16 matrix-product
peak measured in the same invocation (the best of square products of 1024 to 4096).

Usage::

    python -m benchmarks.speed                 # print the table (about 15 minutes on 2 cores)
    python -m benchmarks.speed --write         # and update the speed section of docs/benchmarks.md
    python -m benchmarks.speed --family qwen2  # a random-weight Qwen 2 of SmolLM2-135M's sizes instead
    make bench                                 # the same, with --write
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as `python -m benchmarks.speed` or imported
from common import machine, reset_peak, status_kib, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
MODEL = "smollm2-135m-instruct"
TRAIN = ROOT / "examples" / "data" / "tasks-train.jsonl"
VALIDATION = ROOT / "examples" / "data" / "tasks-validation.jsonl"
LORA = {"r": 16, "alpha": 32, "targets": "all-linear"}
FAMILY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
}
"""``--family`` → transformers config and model classes, and the settings that make the family's model
what it is (Llama 3 rope, Mistral's window); sizes are SmolLM2-135M's."""
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
         "bos_token_id", "eos_token_id", "pad_token_id")

CONFIGS: dict[str, dict[str, Any]] = {
    "deltatune": {"kind": "ours", "delta": [{"name": "lora", "config": LORA}]},
    "peft-bf16": {"kind": "peft", "bf16": True, "peer_of": "deltatune"},
    "peft-fp32": {"kind": "peft", "bf16": False, "peer_of": "deltatune"},
    "deltatune-plain": {"kind": "ours", "delta": [{"name": "lora", "config": LORA}], "fast_path": False},
    "deltatune-compile": {"kind": "ours", "delta": [{"name": "lora", "config": LORA}], "compile": True},
    "deltatune-dora": {"kind": "ours", "delta": [{"name": "dora", "config": LORA}], "needs": "deltatune_dora"},
    "deltatune-dora-compile": {"kind": "ours", "delta": [{"name": "dora", "config": LORA}], "compile": True,
                               "needs": "deltatune_dora"},
    "peft-dora-bf16": {"kind": "peft", "bf16": True, "dora": True, "peer_of": "deltatune-dora"},
    "deltatune-qlora": {"kind": "ours", "delta": [{"name": "lora", "config": LORA}], "quantizer": {"name": "nf4"},
                        "needs": "deltatune_nf4"},
    "peft-qlora-bf16": {"kind": "peft", "bf16": True, "nf4": True, "peer_of": "deltatune-qlora", "needs": "bitsandbytes"},
    "deltatune-lomo": {"kind": "ours", "delta": [], "optimizer": "lomo", "needs": "deltatune_lomo"},
    "trainer-lomo-bf16": {"kind": "peft", "bf16": True, "lomo": True, "peer_of": "deltatune-lomo", "needs": "lomo_optim"},
}
DEFAULT_CONFIGS = list(CONFIGS)
NOTES = """Reading the table:
- `deltatune` is the Lightning module as a run gets it: the fast path of `deltatune_families.fast.llama` (unpadded tokens,
  LoRA fused per group of layers reading the same input, hand-written backward, LM head and loss only at labelled
  positions, chunked). `deltatune-plain` is the same module with `fast_path: false` (Hugging Face's forward, bf16
  base under autocast, loss only at labelled positions); `deltatune-compile` is `compile: true` (every decoder
  layer compiled by `torch.compile`, dynamic shapes, through the plain forward; compilation falls in the untimed
  warm-up steps). Compiling speeds the plain forward up, but the hand-fused fast path stays faster, so it remains
  the default; for DoRA (whose layers the fast path runs through their own forward) compiling was slower and held
  more memory.
- `deltatune-lomo` trains every weight in bf16 (no fp32 copy, as the LOMO paper does) while `trainer-lomo-bf16`
  (`transformers.Trainer` with `optim="lomo"`, the `lomo-optim` package) keeps fp32 weights under bf16 autocast;
  their losses are not comparable after so few steps: at the same small learning rate, bf16 weights round away
  much of each update.
- Peak RSS counts the whole process (tokenizer, data, Lightning or Trainer); the deltatune base is loaded directly
  in bf16 (no fp32 copy).
- Since the previous table (2.54x, 13.5% MFU, 0.631 s a step), the fast path changed (same LoRA step, A/B runs of
  12 steps alternating the old and the new code, 3 rounds each: 577 against 569 ms, and 602 against 597 ms in a
  slower hour: about 1%, inside the machine's ±3% noise): the last layer computes only the labelled rows past its
  attention (its keys and values still come from every row); the compute-dtype LoRA copies are refreshed in place
  for the whole model at once (`foreach`) instead of rebuilt group by group (19 ms of a step, now 15 ms); each
  group's LoRA gradients are cast to fp32 once per group, not once per adapter matrix; autocast is only switched
  off where it is on. The table moved more than that (2.54x to 2.68x, 0.631 to 0.577 s) while PEFT's step also
  went from 1.605 to 1.546 s: part of it is the machine's state between runs, so read any one table to about ±5%.
  Committed after this table: the causal mask is built once per shape, not once per layer (3.6 ms of a step).
- MFU counts only unavoidable FLOPs (frozen weights 4 per token, trained 6, causal attention, the LM head at
  labelled positions only) on real tokens, against square bf16 products (AMX). A step of this benchmark holds
  about 450 real tokens (8 short instructions), so every product is a (450 x 576)-sized one.
- Where a step's time goes (wall clock inside one 580 ms LoRA step, idle machine, no profiler): the fused linear
  groups 150 ms forward and 153 ms backward, of which the frozen products 90 + 74 ms and LoRA's skinny products,
  copies and casts 45 + 81 ms; attention 107 ms; the SiLU gate 51 ms; RMSNorm 43 ms; the LM head and loss 21 ms;
  the rest (autograd engine, residual adds, embedding, clipping, AdamW) 59 ms.
- Why MFU stays far from 40%: 40% of this run's peak would be a step of about 226 ms, yet the frozen products
  alone take about 165 ms of a step. Isolated, with weights cold in memory, the same (480 x 576) x (576 x 1,536)
  product runs in 420-445 µs (about 2.0 TFLOP/s, 80% of peak); inside the step it takes 690-840 µs, and 560 µs
  even repeated right away. On this CPU a product that follows 1 ms without matrix products runs about 25% slower
  (416 µs after none, 518 µs after 1 ms, 663 µs after 5 ms of idle Python; keeping the core on tiny bf16 products
  in between removes most of it), and one that follows memory-bound element-wise work slower still, and a
  transformer step alternates the two by construction.
- How far the batch shape limits MFU: the same LoRA step at 32 examples (1,759 real tokens) instead of 8 (457)
  runs at 442 GFLOP/s instead of 339 (idle machine, 6 steps each; 20% and 15% of that run's peak): bigger products
  are faster, but the element-wise work (norms, SiLU, rotary, softmax, dtype conversions) grows with the tokens
  and is memory-bound on 2 cores.
- Tried and not kept: prepacked oneDNN weights (`torch.ops.mkldnn._reorder_linear_weight` with
  `_linear_pointwise`) run the gate/up product in 315 instead of 418 µs but q and down in 202 instead of 139 and
  581 instead of 400 µs (about 8 ms a step at best, for 424 MiB of packed copies); two data-parallel ranks of one
  thread with 4 examples each take 556 ms a step before their all-reduce (3%, for twice the memory); keeping
  `silu(gate)` for backward saves 5-10 ms a step but adds a `tokens x intermediate` tensor per layer (1.8 GB on
  Llama-2-7B at 2 x 1,304 tokens); a bf16 softmax gives the same values as the fp32 one but is slower (297 against
  233 µs); `torch.compile` of the element-wise pieces (earlier session) was within noise.
- The final training loss is one step's loss on 8 examples. deltatune's bf16 base rounds differently from PEFT's
  fp32 weights under autocast (the plain forward lands as far from PEFT as the fast path), so it moves by a few
  percent either way from run to run (1.2% to 2.5% across this session's runs of 16 and 24 steps); the validation
  loss over the whole validation split is the steadier comparison (within 1% in every run).
- Earlier tables came from a machine shared with other jobs (ratios 2.1x-2.4x); `make bench` runs 40 steps in 2
  alternating rounds for medians."""


# -- the batches every configuration trains on ------------------------------------------------------------------
def family_base(family: str, folder: Path) -> Path:
    """A seeded random-weight model of ``family`` (:data:`FAMILY_CONFIGS`) with SmolLM2-135M's sizes and
    head size, in bf16 as SmolLM2's weights are, written with SmolLM2's tokenizer to ``folder``."""
    import torch
    import transformers

    from deltatune.model.loading import load_tokenizer, resolve_base

    smol = transformers.AutoConfig.from_pretrained(resolve_base(MODEL), local_files_only=True)
    config_name, model_name, settings = FAMILY_CONFIGS[family]
    sizes = {key: getattr(smol, key) for key in SIZES}
    config = getattr(transformers, config_name)(**{**sizes, "head_dim": smol.hidden_size // smol.num_attention_heads,
                                                   **settings})
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).to(torch.bfloat16).save_pretrained(folder)
    load_tokenizer(MODEL).save_pretrained(folder)
    return folder


def batch_plan(steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The same batches for every configuration: a seeded order of the training rows, cut up."""
    rows = sum(1 for line in TRAIN.read_text().splitlines() if line.strip())
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    if steps * batch_size > rows:
        raise SystemExit(f"{steps} steps of {batch_size} need {steps * batch_size} rows; the suite has {rows}")
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def suite_rows(tokenizer: Any, path: Path) -> list[dict]:
    """Rows of ``path`` as the ``alpaca`` builder makes them (chat template, loss on the response)."""
    from deltatune.plugin.resolve import resolve

    builder = resolve("dataset_builder", {"name": "alpaca", "config": {"path": str(path), "max_length": 256}})
    return builder.plugin.build(builder.cfg, tokenizer, "train")


def step_flops(config: Any, rows: list[dict], lora_params: int, full: bool) -> float:
    """Unavoidable FLOPs of one training step on ``rows`` (see the module docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = layers * (hidden * (hidden + 2 * kv) + config.num_attention_heads * head_dim * hidden
                       + 3 * hidden * config.intermediate_size)
    per_weight = 6 if full else 4
    flops = 0.0
    for row in rows:
        n = len(row["input_ids"])
        labelled = sum(1 for label in row["labels"][1:] if label != -100)
        flops += n * (per_weight * linear + 6 * lora_params)
        flops += 12 * config.num_attention_heads * head_dim * layers * n * (n + 1) / 2
        flops += labelled * per_weight * config.vocab_size * hidden
    return flops


# -- one configuration, in its own process ----------------------------------------------------------------------
class StepClock:
    """Wall-clock time of each step (end to end: data, forward, backward, optimizer)."""

    def __init__(self) -> None:
        self.ends: list[float] = [time.perf_counter()]

    def tick(self) -> None:
        self.ends.append(time.perf_counter())


def run_ours(cfg: dict, plan: list[list[int]], args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from deltatune.train.loss import token_loss
    from deltatune.model.loading import load_tokenizer
    from deltatune.train.module import DeltaTuneModule
    from deltatune.data.packing import collate
    from deltatune.model.assembly import compute_context
    from deltatune.testing import fast_forward_runs

    tokenizer = load_tokenizer(args.base)
    rows = suite_rows(tokenizer, TRAIN)
    batches = [collate([rows[i] for i in b], tokenizer.pad_token_id) for b in plan]
    lomo = cfg.get("optimizer") == "lomo"
    optimizer = ({"name": "lomo", "config": {"lr": args.lomo_lr}} if lomo else
                 {"name": "adamw", "config": {"lr": args.lr, "schedule": False}})

    class Module(DeltaTuneModule):
        """The real module; only the run reports (base evaluation, samples, adapter) are left out."""

        def on_fit_start(self) -> None:
            pass

        def on_fit_end(self) -> None:
            pass

    module = Module(base=args.base, delta=cfg["delta"], quantizer=cfg.get("quantizer"), optimizer=optimizer,
                    trainable_dtype="bf16" if lomo else "fp32", fast_path=cfg.get("fast_path", True),
                    compile=cfg.get("compile", False), compare_base=False, samples=0)
    clock = StepClock()

    class Clock(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            reset_peak()
            clock.ends = [time.perf_counter()]

        def on_train_batch_end(self, *args: Any) -> None:
            clock.tick()

    trainer = L.Trainer(max_steps=len(plan), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=None if lomo else 1.0, callbacks=[Clock()],
                        default_root_dir=tempfile.mkdtemp(prefix="speed-"))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    load_rss = status_kib()["VmRSS"]
    with fast_forward_runs() as fast:
        trainer.fit(module, train_dataloaders=loader)
    train_peak = status_kib()["VmHWM"]
    losses = [loss for _, loss in module.report.history["train"]]
    model = module.model
    model.eval()
    val = suite_rows(tokenizer, VALIDATION)
    total = count = 0.0
    with torch.no_grad(), compute_context(model):
        for start in range(0, len(val), 16):
            t, c = token_loss(model, collate(val[start:start + 16], tokenizer.pad_token_id))
            total, count = total + float(t), count + c
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_ends": clock.ends, "losses": losses, "val_loss": total / count, "train_peak_kib": train_peak,
            "load_rss_kib": load_rss, "trainable": trainable, "full": not cfg["delta"], "rows": rows,
            "fast_share": len(fast) / len(plan)}


def run_peft(cfg: dict, plan: list[list[int]], args: argparse.Namespace) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from deltatune.train.loss import token_loss
    from deltatune.model.loading import load_model, load_tokenizer, resolve_base
    from deltatune.data.packing import collate

    tokenizer = load_tokenizer(args.base)
    rows = suite_rows(tokenizer, TRAIN)
    ordered = [{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for b in plan for i in b]
    if cfg.get("nf4"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(resolve_base(args.base), quantization_config=quant,
                                                     dtype=torch.float32, local_files_only=True)
    else:
        model = load_model(args.base, torch.float32)
    if not cfg.get("lomo"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules="all-linear", use_dora=bool(cfg.get("dora"))))
    clock = StepClock()
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            reset_peak()
            clock.ends = [time.perf_counter()]

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

        def on_log(self, _args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        """Trainer reading the dataset in order: its batches are the benchmark's batches."""

        def _get_train_sampler(self, *a: Any, **k: Any) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    lomo = cfg.get("lomo")
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="speed-"), max_steps=len(plan), per_device_train_batch_size=len(plan[0]),
        learning_rate=args.lomo_lr if lomo else args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0 if lomo else 1.0, bf16=bool(cfg["bf16"]), logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        optim="lomo" if lomo else "adamw_torch", seed=0, remove_unused_columns=False,
    )
    trainer = InOrder(model=model, args=targs, train_dataset=ordered, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    load_rss = status_kib()["VmRSS"]
    trainer.train()
    train_peak = status_kib()["VmHWM"]
    model.eval()
    val = suite_rows(tokenizer, VALIDATION)
    total = count = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg["bf16"])):
        for start in range(0, len(val), 16):
            t, c = token_loss(model, collate(val[start:start + 16], tokenizer.pad_token_id), fast=False)
            total, count = total + float(t), count + c
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_ends": clock.ends, "losses": losses, "val_loss": total / count, "train_peak_kib": train_peak,
            "load_rss_kib": load_rss, "trainable": trainable, "full": bool(lomo), "rows": rows}


def bf16_peak(threads: int) -> float:
    """The best bf16 matrix-product rate (GFLOP/s) of square products from 1024 to 4096."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        for _ in range(2):
            a @ b
        for _ in range(5 if n < 4096 else 3):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def child(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if name == "peak":
        return {"peak_gflops": bf16_peak(args.threads)}
    cfg = CONFIGS[name]
    plan = batch_plan(args.steps, args.batch_size, args.seed)
    result = (run_ours if cfg["kind"] == "ours" else run_peft)(cfg, plan, args)
    from transformers import AutoConfig

    from deltatune.model.loading import resolve_base

    rows = result.pop("rows")
    config = AutoConfig.from_pretrained(resolve_base(args.base), local_files_only=True)
    lora = 0 if result["full"] else result["trainable"]
    flops = [step_flops(config, [rows[i] for i in b], lora, result["full"]) for b in plan]
    ends = result.pop("step_ends")
    timed = slice(args.warmup, len(plan))
    seconds = ends[-1] - ends[args.warmup]
    supervised = [sum(1 for i in b for label in rows[i]["labels"][1:] if label != -100) for b in plan]
    real = [sum(len(rows[i]["input_ids"]) for i in b) for b in plan]
    losses = result["losses"]
    tail = losses[-max(1, len(losses) // 5):]
    return {
        "name": name, "steps": len(ends) - 1, "step_s": seconds / (len(plan) - args.warmup),
        "supervised_tok_s": sum(supervised[timed]) / seconds, "tok_s": sum(real[timed]) / seconds,
        "gflops": sum(flops[timed]) / seconds / 1e9, "supervised_tokens": sum(supervised),
        "final_loss": statistics.fmean(tail) if tail else float("nan"), "val_loss": result["val_loss"],
        "peak_mib": status_kib()["VmHWM"] / 1024, "train_peak_mib": result["train_peak_kib"] / 1024,
        "load_rss_mib": result["load_rss_kib"] / 1024,
        **({"fast_share": result["fast_share"]} if "fast_share" in result else {}),
    }


# -- the parent: alternate, collect, tabulate -----------------------------------------------------------------------
def available(name: str) -> bool:
    import importlib.util

    needs = CONFIGS[name].get("needs")
    return needs is None or importlib.util.find_spec(needs) is not None


def run_child(name: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, "-m", "benchmarks.speed", "--child", name, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--seed", str(args.seed), "--lr", str(args.lr), "--lomo-lr", str(args.lomo_lr), "--base", str(args.base)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(f"  {name}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(lines[-1][len("RESULT "):])
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
    print(f"  {name}: {shown}", flush=True)
    return result


def median_rows(results: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for name, runs in results.items():
        if runs:
            rows[name] = {k: statistics.median([r[k] for r in runs]) if isinstance(runs[0][k], (int, float)) else runs[0][k]
                          for k in runs[0]}
    return rows


def table(rows: dict[str, dict], peak: float) -> str:
    import peft
    import transformers

    lines = [
        "| configuration | supervised tok/s | vs peer | tok/s (all real) | step (s) | GFLOP/s | MFU | "
        "peak RSS (MiB) | peak RSS in training | final train loss | validation loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        peer = CONFIGS[name].get("peer_of")
        ratio = (f"{rows[peer]['supervised_tok_s'] / row['supervised_tok_s']:.2f}x slower than {peer}"
                 if peer in rows else "")
        if name == "deltatune" and "peft-bf16" in rows:
            ratio = f"**{row['supervised_tok_s'] / rows['peft-bf16']['supervised_tok_s']:.2f}x** peft-bf16"
        elif not peer:
            for other, cfg in CONFIGS.items():
                if cfg.get("peer_of") == name and other in rows and name != "deltatune":
                    ratio = f"{row['supervised_tok_s'] / rows[other]['supervised_tok_s']:.2f}x {other}"
        lines.append(
            f"| {name} | {row['supervised_tok_s']:.1f} | {ratio} | {row['tok_s']:.0f} | {row['step_s']:.3f} | "
            f"{row['gflops']:.0f} | {row['gflops'] / peak:.1%} | {row['peak_mib']:.0f} | {row['train_peak_mib']:.0f} | "
            f"{row['final_loss']:.4f} | {row['val_loss']:.4f} |")
    lines.append("")
    lines.append(f"peft {peft.__version__}, transformers {transformers.__version__}; bf16 matrix-product peak "
                 f"measured in this run: {peak:.0f} GFLOP/s.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per configuration")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over all configurations")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (LoRA, DoRA, QLoRA)")
    parser.add_argument("--lomo-lr", type=float, default=1e-3, help="LOMO learning rate")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--write", action="store_true", help="update the speed section of docs/benchmarks.md")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the targets are met")
    parser.add_argument("--family", choices=list(FAMILY_CONFIGS),
                        help="train a random-weight model of this family with SmolLM2-135M's sizes instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", default=MODEL, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    if args.family:
        folder = tempfile.mkdtemp(prefix=f"speed-{args.family}-")
        atexit.register(shutil.rmtree, folder, True)
        args.base = str(family_base(args.family, Path(folder)))

    names = [n for n in args.configs if available(n)]
    skipped = [n for n in args.configs if n not in names]
    results: dict[str, list[dict]] = {n: [] for n in names}
    peaks: list[float] = []
    started = time.time()
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        peak = run_child("peak", args)
        if peak:
            peaks.append(peak["peak_gflops"])
        for name in order:
            result = run_child(name, args)
            if result:
                results[name].append(result)
    rows = median_rows(results)
    peak = max(peaks) if peaks else float("nan")
    text = table(rows, peak)
    print(text)
    verdict = targets(rows, peak, 2.5 if args.family else 3.0)
    print("\n".join(verdict))
    if args.write:
        cmd = "python -m benchmarks.speed --write" + (
            f" --configs {' '.join(args.configs)}" if args.configs != DEFAULT_CONFIGS else "") + (
            f" --steps {args.steps}" if args.steps != 40 else "") + (
            f" --rounds {args.rounds}" if args.rounds != 2 else "") + (
            f" --batch-size {args.batch_size}" if args.batch_size != 8 else "") + (
            f" --family {args.family}" if args.family else "")
        heading = ("## Training speed: deltatune against PEFT + Trainer (CPU)" if not args.family else
                   f"## Training speed on a {args.family}-style model (random weights, SmolLM2-135M's sizes; CPU)")
        notes = [
            heading,
            "",
            f"Command: `{cmd}`{'' if args.family else ' (or `make bench`)'}; {args.rounds} alternating rounds, "
            f"{args.steps} steps of {args.batch_size} examples (the same batches for every configuration, "
            f"{rows.get('deltatune', next(iter(rows.values()), {})).get('supervised_tokens', 0):.0f} supervised "
            f"tokens), the first {args.warmup} steps untimed; medians over rounds; "
            f"{(time.time() - started) / 60:.0f} minutes in all.",
            "",
            f"Machine: {machine()}; {args.threads} threads. Run it alone: other processes on the "
            "machine slow every configuration and move the medians; every figure is a median of alternating "
            "runs, the peak is the best seen.",
            "",
            text,
            "",
            *verdict,
            *( ["", f"Not run (not installed): {', '.join(skipped)}."] if skipped else []),
            "",
            NOTES if not args.family else "Configurations as in the SmolLM2 section above; the model is "
            f"{family_description(args.family)}.",
        ]
        begin, end = (BEGIN, END) if not args.family else (f"<!-- speed:{args.family}:begin -->",
                                                          f"<!-- speed:{args.family}:end -->")
        write_section(f"{begin}\n" + "\n".join(notes).strip() + f"\n{end}", DOCS, begin, end)
    if args.check and any(line.startswith("- MISSED") for line in verdict):
        raise SystemExit(1)


def family_description(family: str) -> str:
    """What ``--family family`` trains: its config class and the settings that make it that family."""
    config_name, _, settings = FAMILY_CONFIGS[family]
    return f"`{config_name}`" + (f" with {json.dumps(settings)}" if settings else "")


def targets(rows: dict[str, dict], peak: float, speedup: float = 3.0) -> list[str]:
    """The issue's targets (deltatune at ``speedup`` x PEFT + Trainer's tokens/s, ...), each marked met or missed."""
    out = ["Targets:"]
    ours, peer = rows.get("deltatune"), rows.get("peft-bf16")
    if ours and peer:
        ratio = ours["supervised_tok_s"] / peer["supervised_tok_s"]
        loss = abs(ours["final_loss"] - peer["final_loss"]) / peer["final_loss"]
        val = abs(ours["val_loss"] - peer["val_loss"]) / peer["val_loss"]
        memory = ours["peak_mib"] <= peer["peak_mib"]
        out.append(f"- {'met' if ratio >= speedup else 'MISSED'}: deltatune at {ratio:.2f}x the supervised tokens/s of "
                   f"PEFT + Trainer (bf16) (target {speedup:g}x)")
        out.append(f"- {'met' if loss <= 0.02 else 'MISSED'}: final training loss within {loss:.1%} of PEFT's "
                   f"(validation loss within {val:.1%}; target 2%)")
        out.append(f"- {'met' if memory else 'MISSED'}: peak RSS {ours['peak_mib']:.0f} MiB against PEFT's "
                   f"{peer['peak_mib']:.0f} MiB (target: no more)")
    if ours:
        mfu = ours["gflops"] / peak
        out.append(f"- {'met' if mfu >= 0.4 else 'MISSED'}: model FLOPs utilisation {mfu:.1%} of the measured "
                   f"bf16 peak (target 40%)")
    return out


if __name__ == "__main__":
    main()
