"""GGUF export of the embedded SmolLM2-135M-Instruct after a short LoRA fit, read back two ways.

A real Lightning fit (LoRA on every linear layer, a few steps on the bundled task suite) writes a
deltatune adapter; ``deltatune.io.gguf.export_gguf`` then writes it as GGUF in each requested type.
Reported per type:

* file size and export time (merge, quantize, write, read back);
* the largest |logit difference| of the file read back by ``transformers``' GGUF loader against the
  adapter model (the export's own report), relative to the largest |logit|;
* the same through deltatune's own GGUF base loading (``load_base("x.gguf")``), on the chat-templated
  prompts, and whether the embedded tokenizer gives the adapter tokenizer's ids;
* whether the greedy answers of the reloaded model equal the adapter model's.

Usage::

    python benchmarks/gguf_export.py                           # f16, q8_0, q4_0; prints the table
    python benchmarks/gguf_export.py --types f16 --write       # and update its section of docs/benchmarks.md

``benchmarks/gguf_llamacpp.py`` runs the files this script leaves in ``--out`` in llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from common import write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gguf-export:begin -->", "<!-- gguf-export:end -->"
PROMPTS = ["What is 17 times 23?", "Reverse the order of these words: red fox jumps", "Name three colours."]
LORA = {"name": "lora", "config": {"r": 8, "alpha": 16, "targets": "all-linear"}}


def fit_lora(out: Path, steps: int) -> Path:
    """A short LoRA fit of SmolLM2 through Lightning; returns the adapter folder."""
    import lightning as L

    from deltatune.data.module import InstructionDataModule
    from deltatune.train.module import DeltaTuneModule

    adapter = out / "adapter"
    module = DeltaTuneModule(base="smollm2-135m-instruct", base_dtype="fp32", compare_base=False, samples=0,
                             delta=[LORA], optimizer={"name": "adamw", "config": {"lr": 2e-3}}, adapter_dir=str(adapter))
    data = InstructionDataModule(
        builder={"name": "alpaca", "config": {"path": str(ROOT / "examples/data/tasks-train.jsonl"), "limit": 16 * steps,
                                               "max_length": 96}},
        base="smollm2-135m-instruct", batch_size=8, val_fraction=0.25,
    )
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=out)
    trainer.fit(module, datamodule=data)
    return adapter


def measure(adapter: Path, out: Path, types: list[str]) -> list[dict]:
    """Export each type and compare the file, read back both ways, with the adapter model."""
    from deltatune.io.adapter import load_adapter
    from deltatune.io.gguf import export_gguf
    from deltatune.model.generation import chat_prompt, generate
    from deltatune.model.loading import load_base, load_tokenizer

    os.environ["DELTATUNE_HOME"] = str(out / "home")  # deltatune's conversions of the files stay here
    model, resolved = load_adapter(adapter)  # the fit recorded base_dtype fp32
    tokenizer = load_tokenizer(resolved.spec.base)
    prompts = [chat_prompt(tokenizer, p) for p in PROMPTS]
    ids = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]]) for p in prompts]
    with torch.no_grad():
        reference = [model(input_ids=i).logits for i in ids]
    answers = generate(model, tokenizer, prompts, max_new_tokens=24)
    rows = []
    for type in types:
        file = out / f"smollm2-lora-{type}.gguf"
        start = time.perf_counter()
        report = export_gguf(adapter, file, type=type, overwrite=True)
        seconds = time.perf_counter() - start
        base, base_tokenizer = load_base(str(file))
        base.eval()
        same_ids = all(base_tokenizer(p, add_special_tokens=False)["input_ids"] == i[0].tolist() for p, i in zip(prompts, ids))
        with torch.no_grad():
            ours = max(float((base(input_ids=i).logits - r).abs().max() / r.abs().max()) for i, r in zip(ids, reference))
        rows.append({
            "type": type, "mib": file.stat().st_size / 2**20, "seconds": seconds,
            "transformers": report.max_abs_logit_diff / report.max_abs_logit, "deltatune": ours,
            "same_ids": report.same_token_ids and same_ids,
            "same_answers": sum(a == b for a, b in zip(generate(base, base_tokenizer, prompts, max_new_tokens=24), answers)),
        })
        print(rows[-1], flush=True)
    return rows


def section(rows: list[dict], steps: int) -> str:
    lines = [BEGIN, "## GGUF export of SmolLM2-135M-Instruct after a LoRA fit", "",
             f"`python benchmarks/gguf_export.py` — LoRA r=8 on every linear layer, {steps} AdamW steps; "
             "logit differences are the largest |difference| divided by the largest |logit| of the adapter "
             "model: for `transformers`' GGUF loader as the export reports it (its plain prompts), for "
             f"deltatune's `load_base` on the {len(PROMPTS)} chat-templated prompts.", "",
             "| type | file | export | rel. logit diff, transformers | rel. logit diff, deltatune `load_base` | "
             f"same token ids | same greedy answers (of {len(PROMPTS)}) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['mib']:.0f} MiB | {r['seconds']:.0f} s | {r['transformers']:.2g} | "
                     f"{r['deltatune']:.2g} | {'yes' if r['same_ids'] else 'NO'} | {r['same_answers']} |")
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gguf-export")
    parser.add_argument("--write", action="store_true", help="update the section of docs/benchmarks.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = fit_lora(args.out, args.steps)
    text = section(measure(adapter, args.out, args.types), args.steps)
    print(text)
    if args.write:
        write_section(text, ROOT / "docs" / "benchmarks.md", BEGIN, END)


if __name__ == "__main__":
    main()
