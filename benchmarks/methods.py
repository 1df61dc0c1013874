"""Base vs tuned exact match of every delta method under one budget, written to docs/benchmarks.md.

Each method trains SmolLM2-135M-Instruct on the bundled task suite with the demo's data, batch size,
steps and evaluation (examples/lora-smollm2.yaml), changing only the method (and its learning rate,
taken from the method's own example). Run it on an otherwise idle machine::

    flock -x /tmp/deltatune-cpu.lock python benchmarks/methods.py --write

A method whose plugin is not installed is listed as missing. ``--steps`` shortens every run alike.
Methods that start from the untouched dense base (every one but QLoRA, whose base is 4-bit) share the
base figures of the LoRA run instead of measuring the same model again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "lora-smollm2.yaml"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"
LORA = {"name": "lora", "config": {"r": 16, "alpha": 32, "targets": "all-linear"}}

METHODS: dict[str, dict] = {
    "LoRA": {"delta": [LORA], "lr": 1.0e-3, "needs": ["lora"]},
    "DoRA": {"base_from": "LoRA", "delta": [{"name": "dora", "config": {"r": 16, "alpha": 32, "targets": "all-linear"}}],
             "lr": 1.0e-3, "needs": ["dora"]},
    "VeRA": {"base_from": "LoRA", "delta": [{"name": "vera", "config": {"r": 256, "targets": "all-linear"}}], "lr": 1.0e-2,
             "needs": ["vera"]},
    "BitFit": {"base_from": "LoRA", "delta": [{"name": "bitfit", "config": {"targets": "all-linear", "add_missing": "auto"}}],
               "lr": 3.0e-3, "needs": ["bitfit"]},
    "QLoRA": {"delta": [LORA], "quantizer": {"name": "nf4"}, "lr": 1.0e-3, "needs": ["lora", "nf4"]},
    "LOMO": {"base_from": "LoRA", "delta": [], "optimizer": {"name": "lomo", "config": {"lr": 1.0e-2, "clip_grad_norm": 1.0,
                                                                    "warmup_steps": 10}}, "needs": ["lomo"]},
}


def installed() -> set[str]:
    """Names of the installed plugins (every kind)."""
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return {p["name"] for p in json.loads(out)["installed"]}


def method_config(method: dict, steps: int | None, root: Path) -> dict:
    """The demo configuration with ``method`` in place of LoRA (a whole file: jsonargparse does not merge
    a plugin reference across two --config files reliably)."""
    config = yaml.safe_load(DEMO.read_text())
    model = config["model"]
    model.update(delta=method["delta"], quantizer=method.get("quantizer"), samples=0,
                 compare_base="base_from" not in method)
    model["optimizer"] = method.get("optimizer") or {"name": "adamw", "config": {"lr": method["lr"], "warmup_steps": 10}}
    config["trainer"]["default_root_dir"] = str(root)
    if steps:
        config["trainer"]["max_steps"] = steps
    return config


def run(name: str, method: dict, steps: int | None, out: Path) -> dict:
    """Train one method; its report (``report.json``) as a dict, plus the wall time."""
    root = out / name.lower()
    config = out / f"{name.lower()}.yaml"
    config.write_text(yaml.safe_dump(method_config(method, steps, root), sort_keys=False))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "fit", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / f"{name.lower()}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1][:200], "wall": wall}
    report = json.loads((root / "report.json").read_text())
    report["wall"] = wall
    (out / f"{name.lower()}.result.json").write_text(json.dumps(report))
    return report


def previous(name: str, out: Path) -> dict | None:
    """The result of an earlier run of ``name`` in ``out`` (kept by ``--only`` runs of other methods)."""
    path = out / f"{name.lower()}.result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cell(report: dict, split: str) -> str:
    """``base → tuned (±points)`` exact match on ``split``."""
    base = report["base_metrics"].get(split, {}).get("exact_match/accuracy")
    tuned = report["tuned_metrics"].get(split, {}).get("exact_match/accuracy")
    if base is None or tuned is None:
        return "—"
    return f"{100 * base:.1f}% → **{100 * tuned:.1f}%** ({100 * (tuned - base):+.1f})"


def share_base(results: dict[str, dict]) -> None:
    """Give methods that start from the dense base the base figures the LoRA run measured."""
    for name, report in results.items():
        source = results.get(METHODS[name].get("base_from", ""), {})
        if "error" not in report and source.get("base_metrics"):
            report["base_metrics"] = source["base_metrics"]


def table(results: dict[str, dict], missing: list[str], steps: int | None) -> str:
    """The markdown section for docs/benchmarks.md."""
    share_base(results)
    lines = [BEGIN, "## Delta methods on the task suite: base vs tuned exact match (SmolLM2-135M-Instruct)", "",
             f"Command: `flock -x /tmp/deltatune-cpu.lock python benchmarks/methods.py --write"
             f"{f' --steps {steps}' if steps else ''}` (CPU, 2 cores). Every method gets the demo's budget "
             "(`examples/lora-smollm2.yaml`: same data, batch size 8, same steps, same evaluation); only the "
             "method and its learning rate (from the method's own example) change. `test`: the six trained "
             "task families on problems never seen; `heldout`: two task families never trained on.", "",
             "| method | trainable params | steps | exact match, test | exact match, heldout | val loss (tuned) | train time | wall time |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for name, report in results.items():
        if "error" in report:
            lines.append(f"| {name} | — | — | failed: {report['error']} | | | | {report['wall']:.0f} s |")
            continue
        loss = report["tuned_metrics"].get("validation", {}).get("perplexity/loss")
        lines.append(f"| {name} | {report.get('parameters', {}).get('trainable', 0):,} | {report['steps']} | {cell(report, 'test')} | "
                     f"{cell(report, 'heldout')} | {loss:.3f} | {report['timings'].get('train_s', 0):.0f} s | "
                     f"{report['wall']:.0f} s |")
    lines += ["", "QLoRA's base is the 4-bit (NF4) model, measured on its own; every other method starts from the "
              "same dense model, whose figures the LoRA run measured once. Train time is the training loop alone; "
              "wall time is the whole `deltatune fit` process (model loading, evaluations, adapter)."]
    demo = results.get("LoRA", {})
    if demo.get("timings"):
        t = demo["timings"]
        lines += ["", f"The LoRA row is `make demo` (`examples/lora-smollm2.yaml`, less its 4 sample generations): "
                  f"{demo['wall']:.0f} s in all — base evaluation {t['base_eval_s']:.0f} s, training "
                  f"{t['train_s']:.0f} s ({demo['steps']} steps), tuned evaluation {t['tuned_eval_s']:.0f} s."]
    if missing:
        lines += ["", f"Not measured (plugin not installed when this ran): {', '.join(missing)}."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace (or append) the methods section of docs/benchmarks.md."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in doc:
        doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END) + 1:]
    else:
        doc = doc.rstrip() + "\n\n" + text
    DOC.write_text(doc)


def main() -> None:
    """Run every available method and print (or write) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="override max_steps for every method")
    parser.add_argument("--only", nargs="*", help="methods to run (default: all); the others keep their last results")
    parser.add_argument("--out", default=str(ROOT / "runs" / "methods"), help="run folders and logs")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--rewrite", action="store_true", help="run nothing: rebuild the table from the last results")
    args = parser.parse_args()
    have = installed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, missing = {}, []
    for name, method in METHODS.items():
        if args.rewrite or (args.only and name not in args.only):
            if (earlier := previous(name, out)) is not None:
                results[name] = earlier
            continue
        if not set(method["needs"]) <= have:
            missing.append(f"{name} (needs {', '.join(sorted(set(method['needs']) - have))})")
            continue
        print(f"{name} …", flush=True)
        results[name] = run(name, method, args.steps, out)
        print(json.dumps({k: results[name].get(k) for k in ("tuned_metrics", "timings", "wall", "error")}), flush=True)
        if args.write:  # after every method, so an interrupted run keeps what it measured
            write_section(table(results, missing, args.steps))
    text = table(results, missing, args.steps)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
