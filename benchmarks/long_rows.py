"""Training and evaluation on long rows: the fast forward against the plain forward, per row length.

SmolLM2-135M-Instruct (``deltatune.model.loading``), LoRA r=16, alpha=32 on every linear layer but the
LM head, AdamW, batch 1. Each row is one long multi-turn conversation: the bundled chat suite's
examples (``examples/data/tasks-train.chat.jsonl``) one after another, rendered by the ``chat``
builder with the tokenizer's chat template (loss on every assistant turn) and cut at the row length.

For each length and path (``fast``: the llama family's fast forward; ``plain``: Hugging Face's forward,
``fast_path: false``) a fresh process loads the model, trains ``--warmup`` + ``--steps`` steps on the
row (forward, backward, optimizer, and the freed heap handed back to the system as ``deltatune fit``
does) and then evaluates it forward-only as the ``perplexity`` evaluator
does (``token_loss`` under ``no_grad``, model in eval mode), ``--steps`` times. The table gives the
row's tokens per second of the timed steps and of the evaluations, and the process's peak resident
memory (``VmHWM``, loading included) after training and after evaluation.

``--attention`` times the fast forward's attention alone (forward and backward, bf16, SmolLM2's heads)
through both of its branches over a range of widths: where the flash kernel overtakes the score
matrices (``deltatune_families.fast.kernels.FLASH_MIN_WIDTH``).

Usage::

    flock -x /tmp/deltatune-cpu.lock python benchmarks/long_rows.py --write   # table, plot, attention
    python benchmarks/long_rows.py --lengths 128 512 --steps 1                 # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, publish, reset_peak, run_child, status_kib, trim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "long-rows.png"
BEGIN, END = "<!-- long-rows:begin -->", "<!-- long-rows:end -->"
MODEL = "smollm2-135m-instruct"
CHATS = ROOT / "examples" / "data" / "tasks-train.chat.jsonl"
LORA = {"r": 16, "alpha": 32, "targets": "all-linear"}
PATHS = ("fast", "plain")
ATTENTION_WIDTHS = (64, 128, 192, 256, 384, 512, 1024, 2048)
ATTENTION_TOKENS = 2048
"""Tokens per timed attention call: ``ATTENTION_TOKENS // width`` examples of each width."""


def long_row(tokenizer: Any, length: int) -> dict:
    """One conversation of the chat suite's examples in turn (one system prompt, then user/assistant
    turns), rendered by the ``chat`` builder and cut at ``length`` tokens."""
    from deltatune.plugin.resolve import resolve

    turns = []
    for line in CHATS.read_text().splitlines():
        turns += [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        if len(turns) > length // 4:  # a turn pair renders to well over eight tokens
            break
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "conversation.jsonl")
        path.write_text(json.dumps({"messages": [{"role": "system", "content": "Answer briefly and exactly."}]
                                    + turns}) + "\n")
        builder = resolve("dataset_builder", {"name": "chat", "config": {"path": str(path), "max_length": length}})
        (row,) = builder.plugin.build(builder.cfg, tokenizer, "train")
    return row


def child(length: int, path: str, args: argparse.Namespace) -> dict:
    """Train and evaluate one row of ``length`` tokens on ``path``, in this process."""
    import torch

    from deltatune.data.packing import collate
    from deltatune.model.assembly import build_model, compute_context, resolve_spec
    from deltatune.model.loading import load_tokenizer
    from deltatune.train.heap import release_freed_heap
    from deltatune.train.loss import token_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.flash_min_width is not None:
        from deltatune_families.fast import kernels

        kernels.FLASH_MIN_WIDTH = args.flash_min_width
    tokenizer = load_tokenizer(MODEL)
    batch = collate([long_row(tokenizer, length)], tokenizer.pad_token_id)
    model = build_model(resolve_spec({"base": MODEL, "delta": [{"name": "lora", "config": LORA}]})).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fast = path == "fast"

    def loss() -> tuple[torch.Tensor, int]:
        with compute_context(model):
            return token_loss(model, batch, fast=fast)

    trim()
    load_rss = status_kib()["VmRSS"]
    reset_peak()
    ends = [time.perf_counter()]
    for _ in range(args.warmup + args.steps):
        total, count = loss()
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_freed_heap()  # as `deltatune fit` does after every micro-batch on the CPU
        ends.append(time.perf_counter())
    train_peak = status_kib()["VmHWM"]
    model.eval()
    evals = []
    with torch.no_grad():
        for _ in range(args.steps):
            start = time.perf_counter()
            loss()
            evals.append(time.perf_counter() - start)
    tokens = int(batch["input_ids"].numel())
    step_s = (ends[-1] - ends[args.warmup]) / args.steps
    return {"length": length, "path": path, "tokens": tokens, "train_tok_s": tokens / step_s,
            "eval_tok_s": tokens / min(evals), "load_mib": load_rss / 1024, "train_peak_mib": train_peak / 1024,
            "peak_mib": status_kib()["VmHWM"] / 1024, "step_s": step_s, "eval_s": min(evals)}


def attention_times(threads: int) -> list[tuple[int, float, float]]:
    """``(width, score-matrix seconds, flash seconds)`` of the fast forward's attention, forward and
    backward, on ``ATTENTION_TOKENS`` tokens of examples that wide (the best of five calls)."""
    import torch

    from deltatune_families.fast import kernels
    from deltatune_families.fast.tokens import TokenLayout

    torch.set_num_threads(threads)
    heads, kv_heads, head_dim = 9, 3, 64
    times = []
    for width in ATTENTION_WIDTHS:
        examples = max(1, ATTENTION_TOKENS // width)
        ids = torch.zeros(examples, width, dtype=torch.long)
        layout = TokenLayout.build({"input_ids": ids, "labels": ids + 1})
        tokens = len(layout.index)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16, requires_grad=True)
        angles = layout.positions[:, None].float() * torch.rand(head_dim // 2)
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]
        cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        grad = torch.randn(tokens, heads * head_dim, dtype=torch.bfloat16)
        best = []
        for threshold in (width + 1, width):  # scores, then flash
            kernels.FLASH_MIN_WIDTH = threshold
            seconds = []
            for _ in range(5):
                start = time.perf_counter()
                out = kernels.Attention.apply(qkv, cos, sin, layout, heads, kv_heads, head_dim, head_dim ** -0.5)
                out.backward(grad)
                seconds.append(time.perf_counter() - start)
            best.append(min(seconds))
        times.append((width, *best))
    return times


def command() -> str:
    return " ".join(["python benchmarks/long_rows.py", *sys.argv[1:]])


def table(results: list[dict], attention: list[tuple[int, float, float]], args: argparse.Namespace) -> str:
    lines = [BEGIN, "## Long rows: fast vs plain forward, by row length", "",
             f"`{command()}` (under `flock -x /tmp/deltatune-cpu.lock`) "
             f"on {machine()}, {args.threads} threads. SmolLM2-135M-Instruct, LoRA r16 all-linear, AdamW, batch 1: "
             f"one multi-turn conversation of the chat suite cut at the length; {args.warmup} warm-up + "
             f"{args.steps} timed steps, evaluation forward-only (the `perplexity` evaluator's `token_loss` "
             "under `no_grad`) the best of "
             f"{args.steps}. Peak RSS is the process's (model loading included).", "",
             "| tokens | path | train tok/s | eval tok/s | eval / train step per token | peak RSS training | "
             "peak RSS after eval | RSS after loading |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['tokens']:,} | {r['path']} | {r['train_tok_s']:,.0f} | {r['eval_tok_s']:,.0f} | "
                     f"{r['eval_s'] / r['step_s']:.2f} | {r['train_peak_mib']:,.0f} MiB | {r['peak_mib']:,.0f} MiB | "
                     f"{r['load_mib']:,.0f} MiB |")
    if attention:
        lines += ["", "The fast forward's attention alone (forward + backward, bf16, 9 query / 3 key-value heads "
                  f"of 64, {ATTENTION_TOKENS:,} tokens of examples of each width, best of 5): score matrices vs "
                  "flash kernel.",
                  "", "| width | scores | flash | flash / scores |", "|---:|---:|---:|---:|"]
        lines += [f"| {w} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {b / a:.2f} |" for w, a, b in attention]
    if PLOT.exists():
        lines += ["", f"![tokens/s and peak RSS by row length]({PLOT.name})"]
    lines.append(END)
    return "\n".join(lines)


def plot(results: list[dict], command: str) -> None:
    """Tokens/s (training, evaluation) and peak RSS against the row length, one colour per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for path, colour in zip(PATHS, ("tab:blue", "tab:orange")):
        rows = [r for r in results if r["path"] == path]
        tokens = [r["tokens"] for r in rows]
        speed.plot(tokens, [r["train_tok_s"] for r in rows], marker="o", color=colour, label=f"{path}: training")
        speed.plot(tokens, [r["eval_tok_s"] for r in rows], marker="s", linestyle="--", color=colour,
                   label=f"{path}: evaluation")
        memory.plot(tokens, [r["peak_mib"] / 1024 for r in rows], marker="o", color=colour, label=path)
    for axis, label in ((speed, "tokens/s"), (memory, "peak RSS (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("row length (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    speed.set_yscale("log")
    fig.suptitle(f"SmolLM2-135M, LoRA r16, batch 1: {command}", fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096, 8192])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--steps", type=int, default=2, help="timed training steps (and evaluations) per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flash-min-width", type=int, default=None,
                        help="the fast attention's flash threshold for this run (default: the kernel's)")
    parser.add_argument("--attention", action="store_true", help="also time the attention's two branches")
    parser.add_argument("--write", action="store_true", help="write the table and plot into docs/")
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args)))
        return
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "warmup", "threads", "flash_min_width") and v is not None]
    results = []
    for length in args.lengths:
        for path in args.paths:
            cmd = [sys.executable, __file__, "--child", str(length), path, *forwarded]
            result = run_child(f"{path} {length}", cmd, ROOT)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    attention = attention_times(args.threads) if args.attention else []
    if args.write:
        try:
            plot(results, command())
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    publish(table(results, attention, args), DOCS, args.write, BEGIN, END)


if __name__ == "__main__":
    main()
