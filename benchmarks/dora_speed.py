"""DoRA step time against LoRA, ours and PEFT's side by side, on SmolLM2-135M-Instruct.

One training step = forward + backward + AdamW step, batch 4 x 128 random tokens, under bf16 autocast
with the frozen base held in bf16 and adapters in fp32, rank 16 on every linear layer but the LM head
(``all-linear``). Four models are built once — deltatune LoRA, deltatune DoRA, PEFT LoRA, PEFT DoRA
— and stepped round-robin (one step each per round) so that machine noise hits all of them alike;
after a few warm-up rounds the median of the timed rounds is reported. The ratio that matters is
DoRA's median over LoRA's median within one implementation (target for deltatune: ≤ 1.25x).

Usage::

    python benchmarks/dora_speed.py                  # print the table
    python benchmarks/dora_speed.py --write          # and update the dora-speed section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from deltatune.model.loading import load_model
from deltatune.model.assembly import ModelSpec, build_model, resolve_spec

MODEL = "smollm2-135m-instruct"
BEGIN, END = "<!-- dora-speed:begin -->", "<!-- dora-speed:end -->"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def ours(method: str, rank: int) -> torch.nn.Module:
    """deltatune's model: the pipeline every run uses, base in bf16."""
    config = {"r": rank, "alpha": 2 * rank, "targets": "all-linear"}
    return build_model(resolve_spec(ModelSpec(base=MODEL, delta=[{"name": method, "config": config}], base_dtype="bf16")))


def peft(method: str, rank: int) -> torch.nn.Module:
    """PEFT's model on the same bf16 base (PEFT keeps its adapter weights in fp32)."""
    from peft import LoraConfig, get_peft_model

    base = load_model(MODEL, torch.bfloat16)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=method == "dora")
    return get_peft_model(base, config)


def stepper(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> Callable[[], float]:
    """A function doing one timed training step of ``model`` on ``batch``; returns seconds."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = batch.to(device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def run(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    """Build the four models, time them round-robin; the table rows and an environment line."""
    device = torch.device(args.device)
    batch = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    runs: dict[tuple[str, str], Callable[[], float]] = {}
    counts: dict[tuple[str, str], int] = {}
    for impl, build in (("deltatune", ours), ("PEFT", peft)):
        for method in ("lora", "dora"):
            model = build(method, args.rank)
            counts[(impl, method)] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            runs[(impl, method)] = stepper(model, batch, device)
            gc.collect()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for round_ in range(args.warmup + args.steps):
        for key, step in runs.items():
            seconds = step()
            if round_ >= args.warmup:
                times[key].append(seconds)
        print(f"round {round_ + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{i} {m} {t[-1]:.3f}s" for (i, m), t in times.items() if t), flush=True)
    rows = []
    for impl in ("deltatune", "PEFT"):
        lora = times[(impl, "lora")]
        for method, label in (("lora", "LoRA"), ("dora", "DoRA")):
            own = times[(impl, method)]
            median = statistics.median(own)
            paired = statistics.median(t / base for t, base in zip(own, lora))  # same round: same machine load
            rows.append([impl, label, f"{median:.3f}", f"{min(own):.3f}–{max(own):.3f}",
                         f"{median / statistics.median(lora):.2f}x", f"{paired:.2f}x", f"{counts[(impl, method)]:,}"])
    env = (f"{device.type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                               f", {torch.get_num_threads()} thread(s), {platform.machine()}")
           + f"; torch {torch.__version__}; {args.warmup} warm-up + {args.steps} timed rounds")
    return rows, env


def table(rows: list[list[str]]) -> str:
    """The markdown table of the results."""
    header = ("| implementation | method | median step (s) | min–max (s) | median / LoRA's median "
              "| median of per-round ratio to LoRA | trainable parameters |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_docs(rows: list[list[str]], env: str, command: str) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md, leaving the rest alone."""
    section = f"""{BEGIN}
## DoRA vs LoRA step time (SmolLM2-135M-Instruct)

Command: `{command}` ({env}).

Training step = forward + backward + AdamW step; batch 4 x 128 tokens; bf16 autocast, frozen base in
bf16, adapters in fp32; rank 16, alpha 32 on every linear layer but the LM head (210 layers). The
four models are stepped round-robin (one step each per round), so a round sees one machine load;
the per-round ratio DoRA / LoRA is the robust number on a shared machine.

{table(rows)}

How deltatune's DoRA stays close to LoRA: the row norm `||W + s·B A||` (a constant of backward) is
computed as `sqrt(||W||² + rowdot(B, 2s·W Aᵀ + s²·B (A Aᵀ)))` with `||W||²` cached, so no `out x in`
matrix is built per forward (PEFT builds `W + s·B A` every forward, and gets `B A` by pushing an
`in x in` identity through the adapter); the rescaling `(m / n) ⊙ (W x + s·B A x)` reuses the base
output and is one autograd function that passes over the `tokens x out` activations twice forward
(add, multiply) and three times backward (multiply, multiply-and-sum); `s` multiplies the rank-16 intermediate, not the output. PEFT's rescaling multiplies
bf16 activations by an fp32 vector, which on CPU is a slow mixed-dtype path.

On this shared 2-core machine, two threads per process made steps 5–10x slower and erratic (OpenMP
threads spinning while other jobs held the cores), hence `--threads 1`; the ratios are what matters.
{END}"""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


def main() -> None:
    """Parse arguments, run, print, optionally write the docs section."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, env = run(args)
    print(table(rows))
    print(env)
    if args.write:
        options = {"--steps": (args.steps, 10), "--warmup": (args.warmup, 3), "--threads": (args.threads, 0)}
        command = "python benchmarks/dora_speed.py --write" + "".join(
            f" {flag} {value}" for flag, (value, default) in options.items() if value != default)
        write_docs(rows, env, command)


if __name__ == "__main__":
    main()
