"""The SmolLM2 GGUF files deltatune exported, run in llama.cpp (``llama-cpp-python``), against deltatune.

Reads the adapter and the ``smollm2-lora-*.gguf`` files ``benchmarks/gguf_export.py`` left in
``--out`` and reports, per file, on chat-templated prompts:

* whether llama.cpp tokenizes them into the adapter tokenizer's ids (special tokens included);
* the largest |logit difference| of llama.cpp's logits (every position) against the adapter model,
  relative to its largest |logit|;
* whether llama.cpp's greedy answer equals deltatune's (``deltatune.model.generation.generate`` with
  the adapter), and the chat template llama.cpp reads from the file.

Usage::

    pip install llama-cpp-python                # an sdist: compiles llama.cpp (10-20 min on 2 cores)
    python benchmarks/gguf_export.py            # writes runs/gguf-export/
    python benchmarks/gguf_llamacpp.py [--write]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import write_section
from gguf_export import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gguf-llamacpp:begin -->", "<!-- gguf-llamacpp:end -->"
MAX_NEW_TOKENS = 24


def llama_cpp_greedy(llm, ids: list[int], eos: int) -> list[int]:
    """Greedy continuation of ``ids`` in llama.cpp (argmax of its logits, up to EOS)."""
    llm.reset()
    out: list[int] = []
    llm.eval(ids)
    for _ in range(MAX_NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def measure(out: Path) -> list[dict]:
    from llama_cpp import Llama

    from deltatune.io.adapter import load_adapter
    from deltatune.model.generation import chat_prompt, generate
    from deltatune.model.loading import load_tokenizer

    model, resolved = load_adapter(out / "adapter")  # the fit recorded base_dtype fp32
    tokenizer = load_tokenizer(resolved.spec.base)
    prompts = [chat_prompt(tokenizer, p) for p in PROMPTS]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([i])).logits[0].numpy() for i in ids]
    answers = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    rows = []
    for file in sorted(out.glob("smollm2-lora-*.gguf")):
        llm = Llama(model_path=str(file), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
        same_ids = all(llm.tokenize(p.encode(), add_bos=False, special=True) == i for p, i in zip(prompts, ids))
        diffs = []
        for i, ref in zip(ids, reference):
            llm.reset()
            llm.eval(i)
            diffs.append(float(np.abs(llm.scores[: len(i)] - ref).max() / np.abs(ref).max()))
        theirs = [tokenizer.decode(llama_cpp_greedy(llm, i, tokenizer.eos_token_id), skip_special_tokens=True).strip()
                  for i in ids]
        rows.append({
            "file": file.name, "same_ids": same_ids, "logits": max(diffs),
            "same_answers": sum(a == b for a, b in zip(theirs, answers)),
            "chat_template": llm.metadata.get("tokenizer.chat_template") == tokenizer.chat_template,
            "answers": list(zip(answers, theirs)),
        })
        print(rows[-1], flush=True)
        del llm
    return rows


def section(rows: list[dict]) -> str:
    lines = [BEGIN, "## The exported SmolLM2 GGUF files in llama.cpp", "",
             "`python benchmarks/gguf_llamacpp.py` — llama-cpp-python, CPU; the files of "
             "`benchmarks/gguf_export.py`. Logit differences: largest |difference| at every prompt position "
             "against the adapter model, divided by its largest |logit|.", "",
             f"| file | same token ids | rel. logit diff | same greedy answers (of {len(PROMPTS)}, "
             f"{MAX_NEW_TOKENS} tokens) | chat template read back |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | {'yes' if r['same_ids'] else 'NO'} | {r['logits']:.2g} | {r['same_answers']} | "
                     f"{'yes' if r['chat_template'] else 'NO'} |")
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gguf-export")
    parser.add_argument("--write", action="store_true", help="update the section of docs/benchmarks.md")
    args = parser.parse_args()
    text = section(measure(args.out))
    print(text)
    if args.write:
        write_section(text, ROOT / "docs" / "benchmarks.md", BEGIN, END)


if __name__ == "__main__":
    main()
