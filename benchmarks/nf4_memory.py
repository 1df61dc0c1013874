"""NF4 memory and error on SmolLM2-135M-Instruct: bytes of the quantized linear weights against bf16.

For the default base model (loaded with ``deltatune.model.loading.load_base``), every linear layer the
``nf4`` quantizer targets by default (all but the LM head, which SmolLM2 ties to the embeddings) is
quantized with and without double quantization. Reported per setting:

* bytes of those weights: packed 4-bit codes + absmax (+ the double-quantization scales) + the
  per-layer code tables, against the same weights in bf16;
* the dequantization error over all of them (relative Frobenius norm, mean and max absolute), next
  to the error of merely rounding them to bf16;
* the next-token loss of the whole model on a fixed text, against the fp32 model.

Usage::

    python benchmarks/nf4_memory.py                 # print the table
    python benchmarks/nf4_memory.py --write         # and update the nf4 section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from pathlib import Path

import bitsandbytes
import torch

from common import publish
from deltatune.model.loading import load_base
from deltatune_nf4 import NF4, NF4Config, dequantize_weight, is_quantized, memory_report, select_layers

MODEL = "smollm2-135m-instruct"
BEGIN, END = "<!-- nf4-memory:begin -->", "<!-- nf4-memory:end -->"
COMMAND = "python benchmarks/nf4_memory.py --write"
TEXT = (
    "The quick brown fox jumps over the lazy dog. Photosynthesis is the process by which green plants "
    "use sunlight to synthesize foods from carbon dioxide and water. The French Revolution began in "
    "1789 and profoundly changed the political landscape of Europe. To compute the area of a circle, "
    "multiply pi by the square of its radius."
)


class ErrorSum:
    """Accumulates the error of approximations of many weight matrices."""

    def __init__(self) -> None:
        self.sq_err = self.sq_ref = self.abs_err = 0.0
        self.count = 0
        self.max_abs = 0.0

    def add(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        diff = approx.float() - reference.float()
        self.sq_err += diff.pow(2).sum().item()
        self.sq_ref += reference.float().pow(2).sum().item()
        self.abs_err += diff.abs().sum().item()
        self.max_abs = max(self.max_abs, diff.abs().max().item())
        self.count += diff.numel()

    @property
    def relative(self) -> float:
        return math.sqrt(self.sq_err / self.sq_ref)

    @property
    def mean_abs(self) -> float:
        return self.abs_err / self.count


@torch.no_grad()
def loss_on_text(model: torch.nn.Module, tokenizer) -> float:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    model.eval()
    return model(ids, labels=ids).loss.item()


def run() -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_base(MODEL)
    load_s = time.perf_counter() - started
    names = select_layers(model, NF4Config())
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    weights = sum(w.numel() for w in dense.values())

    bf16_error = ErrorSum()
    for w in dense.values():
        bf16_error.add(w, w.bfloat16())
    rows = [
        {
            "setting": "bf16 (reference)",
            "bytes": 2 * weights,
            "code_tables": 0,
            "ratio": 1.0,
            "bits": 16.0,
            "error": bf16_error,
            "loss": None,
            "seconds": None,
        }
    ]
    fp32_loss = loss_on_text(model, tokenizer)
    for double_quant in (True, False):
        quantized = copy.deepcopy(model)
        started = time.perf_counter()
        NF4().quantize(quantized, NF4Config(double_quant=double_quant))
        seconds = time.perf_counter() - started
        report = memory_report(quantized)
        assert report["weights"] == weights and report["layers"] == len(names)
        error = ErrorSum()
        for name in names:
            layer = quantized.get_submodule(name)
            assert is_quantized(layer)
            error.add(dense[name], dequantize_weight(layer))
        rows.append(
            {
                "setting": f"nf4, double_quant={str(double_quant).lower()}",
                "bytes": report["total"],
                "code_tables": report["code_tables"],
                "ratio": report["ratio"],
                "bits": report["bits_per_weight"],
                "error": error,
                "loss": loss_on_text(quantized, tokenizer),
                "seconds": seconds,
            }
        )
        del quantized
    meta = {
        "layers": len(names),
        "weights": weights,
        "fp32_loss": fp32_loss,
        "load_s": load_s,
        "tokens": len(tokenizer(TEXT).input_ids),
        "tied_head": model.lm_head.weight is model.get_input_embeddings().weight,
    }
    return rows, meta


def table(rows: list[dict], meta: dict) -> str:
    mib = 1024 * 1024
    lines = [
        "| setting | bytes of the linear weights | ratio to bf16 | bits / weight | rel. error (Frobenius) "
        "| mean abs. error | max abs. error | loss on text (fp32: {:.4f}) | quantize time |".format(meta["fp32_loss"]),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        err = row["error"]
        loss = "—" if row["loss"] is None else f"{row['loss']:.4f}"
        seconds = "—" if row["seconds"] is None else f"{row['seconds']:.1f} s"
        tables = f" (code tables {row['code_tables'] / 1024:.0f} KiB)" if row["code_tables"] else ""
        lines.append(
            f"| {row['setting']} | {row['bytes'] / mib:.2f} MiB{tables} | {row['ratio']:.4f}x | {row['bits']:.3f} "
            f"| {err.relative:.4f} | {err.mean_abs:.2e} | {err.max_abs:.2e} | {loss} | {seconds} |"
        )
    return "\n".join(lines)


def section(rows: list[dict], meta: dict) -> str:
    cpu = platform.processor() or platform.machine()
    return f"""{BEGIN}
## NF4 quantizer: memory and dequantization error (SmolLM2-135M-Instruct)

Command: `{COMMAND}` (CPU only; {torch.get_num_threads()} threads, {cpu}; torch {torch.__version__},
bitsandbytes {bitsandbytes.__version__}).

The `nf4` quantizer with its defaults (blocksize 64, every linear layer but the LM head; SmolLM2's
head is tied to the embeddings{' and stays dense' if meta['tied_head'] else ''}) quantizes
{meta['layers']} layers holding {meta['weights']:,} weights. Bytes count the packed 4-bit codes, the
absmax constants (uint8 with double quantization, fp32 without), the double-quantization scales and
the 16- and 256-entry code tables bitsandbytes keeps per layer; biases, embeddings and norms are not
included. Errors compare the dequantized weights with the fp32 weights as loaded; the loss is the
whole model's next-token loss on a fixed {meta['tokens']}-token English text.

{table(rows, meta)}

Notes:
- Theory: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight (0.258x of bf16) with double quantization,
  4 + 32/64 = 4.5 bits (0.281x) without; the code tables add about 1 KiB per layer.
- The default model ships as a Q4_1 GGUF file, so its fp32 weights already lie on a 4-bit grid per
  block of 32; NF4 re-rounds them, and the error here is of that second rounding.
{END}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update the nf4 section of docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows, meta = run()
    text = section(rows, meta)
    publish(text, args.docs, args.write, BEGIN, END)


if __name__ == "__main__":
    main()
