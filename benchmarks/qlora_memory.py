"""QLoRA against bf16 LoRA on SmolLM2-135M-Instruct: resident memory, step time, validation loss.

Both configurations train LoRA (r=16, alpha=32, every linear layer but the LM head) through
deltatune's own training path — :class:`deltatune.data.module.InstructionDataModule` with the demo's data
(``examples/data/tasks-train.jsonl``, batch 8, length-grouped, max length 256),
:func:`deltatune.model.assembly.build_model`, :func:`deltatune.train.loss.token_loss` under the core's compute
context, and the ``adamw`` plugin's optimizer and schedule, stepped as ``DeltaTuneModule`` steps it —
for the same steps on the same batches. They differ only in the base: bf16 weights (LoRA) or the
``nf4`` quantizer with double quantization computing in bf16 (QLoRA). Each runs in a fresh process
(one run's allocations cannot hide or inflate another's). Reported:

* RSS after imports, and RSS after the model is built (``gc`` + ``malloc_trim`` done);
* the peak RSS of loading (``VmHWM`` then): the base is read in fp32 and converted;
* the peak RSS *during training*: ``VmHWM`` reset (``/proc/self/clear_refs``) right before the first
  step and read after the last, optimizer state included;
* the peak of the whole process (``ru_maxrss``), seconds per step, and the validation loss (mean over
  every labelled token of ``tasks-validation.jsonl``) before and after training.

Usage::

    flock -x /tmp/deltatune-cpu.lock python benchmarks/qlora_memory.py --write
    python benchmarks/qlora_memory.py --child qlora --steps 2     # one configuration, JSON (internal)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from common import machine, mib, publish, reset_peak, run_child, status_kib, trim

MODEL = "smollm2-135m-instruct"
BEGIN, END = "<!-- qlora-memory:begin -->", "<!-- qlora-memory:end -->"
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
LORA = {"name": "lora", "config": {"r": 16, "alpha": 32, "targets": "all-linear"}}
NF4 = {"name": "nf4", "config": {"double_quant": True, "compute_dtype": "bf16"}}
OPTIMIZER = {"name": "adamw", "config": {"lr": 1.0e-3, "warmup_steps": 10}}
LOSS_TARGET = 0.05  # QLoRA's validation loss within 5 % of LoRA's

# name -> (description, quantizer)
CONFIGS: dict[str, tuple[str, dict | None]] = {
    "lora": ("LoRA, bf16 base", None),
    "qlora": ("QLoRA, nf4 base (double quant)", NF4),
}


# -- one configuration (child process) ---------------------------------------------------------
def child(name: str, steps: int, threads: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported before the first measurement, like torch)

    import deltatune_nf4
    from deltatune.plugin.resolve import resolve
    from deltatune.data.module import InstructionDataModule
    from deltatune.train.loss import token_loss
    from deltatune.deltas.layer import is_quantized_param
    from deltatune.model.assembly import ModelSpec, build_model, compute_context, resolve_spec, trainable_summary

    _, quantizer = CONFIGS[name]
    trim()
    after_imports = status_kib()
    builder = {"name": "alpaca", "config": {"path": str(DATA / "tasks-train.jsonl"),
                                            "validation_path": str(DATA / "tasks-validation.jsonl"),
                                            "max_length": 256}}
    data = InstructionDataModule(builder=builder, base=MODEL, batch_size=8, eval_batch_size=16, group_by_length=True,
                                 seed=seed)
    data.setup("fit")
    resolved = resolve_spec(ModelSpec(base=MODEL, quantizer=quantizer, delta=[LORA], base_dtype="bf16"))
    torch.manual_seed(seed)  # the same LoRA initialisation in both configurations
    trim()
    reset_peak()
    start = time.perf_counter()
    model = build_model(resolved)
    load_s = time.perf_counter() - start
    load_peak = status_kib()["VmHWM"]
    trim()
    loaded = status_kib()
    trainable, total = trainable_summary(model)
    nf4 = deltatune_nf4.memory_report(model)
    head_tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                      if not p.requires_grad and not is_quantized_param(p))

    def val_loss() -> float:
        model.eval()
        total_loss, count = 0.0, 0
        with torch.no_grad():
            for batch in data.val_dataloader():
                with compute_context(model):
                    loss, n = token_loss(model, batch)
                total_loss, count = total_loss + float(loss), count + n
        model.train()
        return total_loss / count

    before = val_loss()
    adamw = resolve("optimizer", OPTIMIZER)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = adamw.plugin.create(named, adamw.cfg, steps)
    batches = iter(())
    losses = []
    model.train()
    trim()
    ready = status_kib()
    reset_peak()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:  # a new epoch (the sampler is seeded: the same order for every configuration)
            batches = iter(data.train_dataloader())
            batch = next(batches)
        with compute_context(model):
            total_loss, count = token_loss(model, batch)
        loss = total_loss / max(count, 1)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = (time.perf_counter() - start) / steps
    peak_train = status_kib()["VmHWM"]
    after = val_loss()
    return {
        "name": name,
        "steps": steps,
        "seed": seed,
        "after_imports_kib": after_imports["VmRSS"],
        "load_peak_kib": load_peak,
        "loaded_kib": loaded["VmRSS"],
        "loaded_anon_kib": loaded["RssAnon"],
        "loaded_file_kib": loaded["RssFile"],
        "ready_kib": ready["VmRSS"],
        "peak_train_kib": peak_train,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "load_s": load_s,
        "seconds_per_step": seconds,
        "val_loss_before": before,
        "val_loss": after,
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "trainable": trainable,
        "total": total,
        "nf4_layers": int(nf4["layers"]),
        "nf4_bytes": int(nf4["total"]),
        "nf4_weights": int(nf4["weights"]),
        "dense_frozen_bytes": dense_bytes,
        "head_tied": head_tied,
        "embedding_shape": list(model.get_input_embeddings().weight.shape),
        "val_rows": len(data.rows("validation")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# -- driver ------------------------------------------------------------------------------------
def run(names: list[str], steps: int, threads: int, seed: int) -> list[dict]:
    args = ["--steps", str(steps), "--threads", str(threads), "--seed", str(seed)]
    return [run_child(name, [sys.executable, __file__, "--child", name, *args], ROOT) for name in names]


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["name"] == "lora"), None)
    lines = [
        "| configuration | frozen base weights | RSS after imports | peak RSS while loading | RSS after model load "
        "| peak RSS in training | ratio to LoRA | above imports, ratio to LoRA | s / step "
        "| val. loss before | val. loss after | ratio to LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        desc = CONFIGS[r["name"]][0]
        frozen = (r["nf4_bytes"] + r["dense_frozen_bytes"]) / 2**10
        ratio = above = loss_ratio = "—"
        if ref:
            ratio = f"{r['peak_train_kib'] / ref['peak_train_kib']:.2f}x"
            above = (r["peak_train_kib"] - r["after_imports_kib"]) / (ref["peak_train_kib"] - ref["after_imports_kib"])
            above = f"{above:.2f}x"
            loss_ratio = f"{r['val_loss'] / ref['val_loss']:.3f}"
        lines.append(
            f"| {desc} | {mib(frozen)} | {mib(r['after_imports_kib'])} | {mib(r['load_peak_kib'])} "
            f"| {mib(r['loaded_kib'])} | {mib(r['peak_train_kib'])} | {ratio} | {above} "
            f"| {r['seconds_per_step']:.2f} | {r['val_loss_before']:.4f} | {r['val_loss']:.4f} | {loss_ratio} |"
        )
    return "\n".join(lines)


def notes_for(rows: list[dict], others: list[dict]) -> str:
    """Notes on ``rows`` (one seed); ``others``: the rows of further seeds, for the validation loss."""
    by = {r["name"]: r for r in rows}
    out = ["Notes:"]
    if {"lora", "qlora"} <= by.keys():
        lora, q = by["lora"], by["qlora"]
        gap = q["val_loss"] / lora["val_loss"] - 1
        out.append(
            f"- Validation loss after {q['steps']} steps: QLoRA {q['val_loss']:.4f} vs LoRA {lora['val_loss']:.4f} "
            f"({gap:+.1%}; target within {LOSS_TARGET:.0%}: {'met' if abs(gap) <= LOSS_TARGET else 'NOT met'}). "
            f"Before training the 4-bit base alone costs {q['val_loss_before'] - lora['val_loss_before']:+.4f} "
            f"({q['val_loss_before']:.4f} vs {lora['val_loss_before']:.4f}). Seed {q.get('seed', 0)}: the same batch "
            "order and LoRA initialisation for both."
        )
        for seed in dict.fromkeys(r["seed"] for r in others):
            pair = {r["name"]: r for r in others if r["seed"] == seed}
            if {"lora", "qlora"} <= pair.keys():
                gap = pair["qlora"]["val_loss"] / pair["lora"]["val_loss"] - 1
                out.append(
                    f"- The same with seed {seed} (another batch order and LoRA initialisation): QLoRA "
                    f"{pair['qlora']['val_loss']:.4f} vs LoRA {pair['lora']['val_loss']:.4f} ({gap:+.1%}; "
                    f"{'met' if abs(gap) <= LOSS_TARGET else 'NOT met'}); peak RSS in training "
                    f"{mib(pair['qlora']['peak_train_kib'])} vs {mib(pair['lora']['peak_train_kib'])} "
                    f"({pair['qlora']['peak_train_kib'] / pair['lora']['peak_train_kib']:.2f}x). The peaks depend on "
                    f"the batch order (seed {lora.get('seed', 0)}'s and seed {seed}'s differ by up to "
                    f"{max(abs(pair[k]['peak_train_kib'] - by[k]['peak_train_kib']) for k in pair) / 1024:,.0f} MiB), "
                    "as much as QLoRA saves at the peak; the saving after loading does not "
                    f"({(pair['lora']['loaded_kib'] - pair['qlora']['loaded_kib']) / 1024:,.0f} MiB with this seed)."
                )
        saved = (lora["peak_train_kib"] - q["peak_train_kib"]) / 1024
        base_weights = q["total"] - q["trainable"]
        rows_, cols = q["embedding_shape"]
        tied = ", which SmolLM2 ties to the LM head (nf4 leaves tied weights dense)" if q["head_tied"] else ""
        out.append(
            f"- Peak RSS in training: QLoRA {mib(q['peak_train_kib'])} vs LoRA {mib(lora['peak_train_kib'])} "
            f"({abs(saved):,.0f} MiB {'less' if saved >= 0 else 'more'}, "
            f"{q['peak_train_kib'] / lora['peak_train_kib']:.2f}x). Only part of the model is quantized: the "
            f"{q['nf4_layers']} linear layers hold {q['nf4_weights']:,} of the base's {base_weights:,} weights "
            f"({q['nf4_weights'] / base_weights:.0%}), in {q['nf4_bytes'] / 2**20:,.1f} MiB instead of "
            f"{2 * q['nf4_weights'] / 2**20:,.1f} MiB of bf16. What stays dense is "
            f"{q['dense_frozen_bytes'] / 2**20:,.1f} MiB of bf16: the embedding matrix ({rows_:,} x {cols}){tied}, "
            "and the norms. So the frozen base shrinks from "
            f"{lora['dense_frozen_bytes'] / 2**20:,.0f} to {(q['nf4_bytes'] + q['dense_frozen_bytes']) / 2**20:,.0f} MiB "
            f"(QLoRA's process holds {(lora['loaded_kib'] - q['loaded_kib']) / 1024:,.0f} MiB less after loading, "
            f"{(lora['ready_kib'] - q['ready_kib']) / 1024:,.0f} MiB less right before the first step). The "
            f"training peak saves less than that because a step itself takes more memory on the 4-bit base: "
            f"{(q['peak_train_kib'] - q['ready_kib']) / 1024:,.0f} MiB above the RSS before training against "
            f"{(lora['peak_train_kib'] - lora['ready_kib']) / 1024:,.0f} MiB for LoRA. deltatune's fast path "
            "(`deltatune_families.fast.llama` (the llama family plugin)) fuses the LoRA products, with a hand-written backward that keeps fewer tensors, "
            "only on dense linear layers; a quantized layer runs its own forward inside it (bitsandbytes' 4-bit "
            "product, then the LoRA product through autograd). The rest of the peak is much the same in both: about "
            f"{lora['after_imports_kib'] / 1024:,.0f} MiB of imported libraries (torch, transformers, Lightning), "
            f"the adapters with their gradients and AdamW state ({q['trainable']:,} fp32 parameters, 4 x "
            f"{q['trainable'] * 4 / 2**20:,.0f} MiB), and the activations autograd keeps for a batch of 8 rows of "
            "up to 256 tokens. On a 135M model these fixed costs dominate; on Llama-2-7B the quantized linear layers "
            "are 96% of 6.7B weights (12.6 GiB in bf16), so the same quantization saves far more of the total."
        )
        out.append(
            "- Loading: `build_model` reads LoRA's base straight in bf16, but QLoRA's in fp32 (the quantizer "
            "quantizes from fp32 weights, layer by layer), so QLoRA's loading peak is "
            f"{mib(q['load_peak_kib'])} against {mib(lora['load_peak_kib'])}, and the peak of the whole process "
            f"(`ru_maxrss`, loading included) {mib(q['ru_maxrss_kib'])} against {mib(lora['ru_maxrss_kib'])}; "
            f"building the model took {q['load_s']:.1f} s against {lora['load_s']:.1f} s."
        )
        out.append(
            f"- Time: {q['seconds_per_step']:.2f} vs {lora['seconds_per_step']:.2f} s per step "
            f"({q['seconds_per_step'] / lora['seconds_per_step']:.2f}x). On CPU bitsandbytes dequantizes every 4-bit "
            "weight to bf16 at every use (forward, and again in backward for the input gradient) before an ordinary "
            "bf16 product, so QLoRA buys memory with time; the machine is shared, so take times as indicative."
        )
    return "\n".join(out)


def section(rows: list[dict], steps: int, command: str) -> str:
    first = rows[0]
    seeds = list(dict.fromkeys(r.get("seed", 0) for r in rows))
    main = [r for r in rows if r.get("seed", 0) == seeds[0]]
    if len(seeds) == 1:
        commands = f"Command: `{command}{f' --seed {seeds[0]}' if seeds[0] else ''} --write`"
    else:
        saved = [f"`{command}{f' --seed {s}' if s else ''} --save seed{s}.json`" for s in seeds]
        files = " ".join(f"seed{s}.json" for s in seeds)
        commands = (f"Commands: {', '.join(saved)}, then `python benchmarks/qlora_memory.py --rows {files} --write` "
                    f"(the table is seed {seeds[0]}'s, the notes give the others' validation loss)")
    import bitsandbytes

    return f"""{BEGIN}
## QLoRA vs LoRA: memory and validation loss (SmolLM2-135M-Instruct)

{commands}. CPU only, {first['threads']} threads, on {machine()}; bitsandbytes
{bitsandbytes.__version__}. The machine is shared: the exclusive lock keeps the jobs that take it off the
CPUs during the run, others may not be, so take the times as indicative; memory is per process.

Both rows train LoRA (r=16, alpha=32, all-linear: {first['trainable']:,} trainable fp32 parameters) for
{steps} steps of batch 8 on `examples/data/tasks-train.jsonl` (the demo's data: alpaca builder, max length
256, length-grouped with the same seed, so the same batches in the same order), AdamW lr 1e-3 with 10
warm-up steps and cosine decay, through deltatune's training path (`InstructionDataModule`,
`pipeline.build_model`, `losses.token_loss` under the core's bf16 compute context, the `adamw` plugin).
The base is bf16 for LoRA; for QLoRA the `nf4` quantizer (double quantization, bf16 compute) holds every
linear layer but the LM head in 4 bits. Each row is a fresh process. "RSS after model load" is `VmRSS`
after `build_model` (`gc` + `malloc_trim` done); "peak RSS in training" is `VmHWM` reset right before the
first step and read after the last (AdamW's state is allocated inside); "above imports" compares the
peaks minus each process's RSS after imports. Validation loss is the mean over every labelled token of
the {first['val_rows']} rows of `tasks-validation.jsonl`.

{table(main)}

{notes_for(main, [r for r in rows if r.get("seed", 0) != seeds[0]])}
{END}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update the QLoRA section of docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--save", type=Path, help="also save the measured rows as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order and the LoRA initialisation")
    parser.add_argument("--rows", type=Path, nargs="+", help="render rows saved by --save (one or more files, "
                        "e.g. of several seeds: the first seed makes the table) instead of measuring")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads, args.seed)))
        return
    if args.rows:
        rows = [row for path in args.rows for row in json.loads(path.read_text())]
        args.steps, args.threads = rows[0]["steps"], rows[0]["threads"]
    else:
        rows = run(args.only or list(CONFIGS), args.steps, args.threads, args.seed)
    if args.save:
        args.save.write_text(json.dumps(rows, indent=1))
    command = "flock -x /tmp/deltatune-cpu.lock python benchmarks/qlora_memory.py"
    if args.steps != 100:
        command += f" --steps {args.steps}"
    if args.threads != 2:
        command += f" --threads {args.threads}"
    text = section(rows, args.steps, command)
    publish(text, args.docs, args.write, BEGIN, END)


if __name__ == "__main__":
    main()
