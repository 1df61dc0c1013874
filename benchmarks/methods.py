"""Base vs tuned exact match of every delta method under one budget, written to docs/benchmarks.md.

Each method (and each useful combination of methods) trains SmolLM2-135M-Instruct on the bundled task
suite with the demo's data, batch size, steps and evaluation (examples/lora-smollm2.yaml), changing only
the method and its learning rate. ``--sweep`` first runs every method at its three sweep learning rates
(short runs measuring the validation loss only; a further rate beyond either end while the best lies at
that end) and trains the full run at the best of them; without a saved sweep a method uses the middle
value. Sweep runs and full-run reports are kept in ``benchmarks/results/methods`` (:data:`RESULTS`): a
sweep measures only what is not saved there yet, so the work can be split across sessions with ``--only``. Run it on an otherwise idle machine::

    flock -x /tmp/deltatune-cpu.lock python benchmarks/methods.py --sweep --write

The table reports trainable parameters (share of the base), the chosen learning rate, peak RSS, seconds
per step against LoRA's, validation loss, exact match (test and held-out families) and HumanEval, with
Spearman's rank correlation between validation loss and exact match over the rows, and the sweep's
losses per method with the methods whose loss is sensitive to the learning rate.

A method whose plugin is not installed is listed as missing. ``--steps`` shortens every run alike.
With the ``humaneval`` plugin installed, every run also measures HumanEval pass@1 (greedy, chat mode,
all 164 problems; model-written code runs in its sandbox), base and tuned, for a public check that
tuning on the task suite does not make the model worse at code; ``--no-humaneval`` leaves it out.
Methods that start from the untouched dense base (every one but QLoRA, whose base is 4-bit) share the
base figures of the LoRA run instead of measuring the same model again.

``--reevaluate`` trains nothing: it loads each saved run (``<out>/<method>/adapter`` through
:func:`deltatune.io.adapter.load_adapter`, and the run's own config ``<out>/<method>.yaml``) and runs the
run's evaluators again on the current data files, base and tuned, e.g. after the evaluation splits
changed. The base is the run's model as ``fit`` measured it, before any training step (its delta
methods at their initialisation, which LoRA starts as an identity), measured where the run measured
it (``compare_base``): once for the dense base in the LoRA run, on its own for QLoRA's 4-bit base.
The first re-evaluation keeps the figures ``fit`` reported under ``fit_metrics`` in ``<method>.result.json``;
training times and parameter counts stay those of the run. Split it with ``--only`` to keep each
exclusive run short::

    flock -x /tmp/deltatune-cpu.lock python benchmarks/methods.py --reevaluate --only LoRA QLoRA --write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "lora-smollm2.yaml"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "methods"
"""The measurements behind the table, kept in the repository (small JSON files, no weights): each sweep
run as ``sweep/<method>-<lr>.json`` and each full run's report as ``<method>.result.json``, so a table
measured across several sessions (``--only``) is rebuilt from them; run folders stay under ``--out``."""
BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"
LORA = {"name": "lora", "config": {"r": 16, "alpha": 32, "targets": "all-linear"}}
HUMANEVAL = {"name": "humaneval", "splits": ["test"],  # its problems are its own: run it once per phase
             "config": {"allow_code_execution": True, "mode": "chat", "max_new_tokens": 300, "per_problem": True}}
HUMANEVAL_METRIC = "humaneval/pass@1.chat"

def lora(**extra) -> dict:
    """LoRA r16 on every linear layer, with ``extra`` options (rsLoRA, LoRA+, PiSSA/OLoRA init)."""
    return {"name": "lora", "config": {"r": 16, "alpha": 32, "targets": "all-linear", **extra}}


ADAPTER_SIZE = {"reduction_factor": 16}
"""Bottleneck width hidden / 16 (36 for SmolLM2's 576): about LoRA r16's trainable parameters."""
LOW_LR, MID_LR, HIGH_LR = (3.0e-4, 1.0e-3, 3.0e-3), (1.0e-3, 3.0e-3, 1.0e-2), (3.0e-3, 1.0e-2, 3.0e-2)
"""The three-value learning-rate sweeps: one per scale of the methods' usual learning rates."""

METHODS: dict[str, dict] = {
    "LoRA": {"delta": [LORA], "lrs": LOW_LR, "needs": ["lora"]},
    "rsLoRA": {"base_from": "LoRA", "delta": [lora(rslora=True)], "lrs": LOW_LR, "needs": ["lora"]},
    "LoRA+": {"base_from": "LoRA", "delta": [lora(loraplus_lr_ratio=16)], "lrs": (1.0e-4, 3.0e-4, 1.0e-3),
              "needs": ["lora"]},
    "PiSSA": {"base_from": "LoRA", "delta": [lora(init="pissa")], "lrs": LOW_LR, "needs": ["lora"]},
    "OLoRA": {"base_from": "LoRA", "delta": [lora(init="olora")], "lrs": LOW_LR, "needs": ["lora"]},
    "DoRA": {"base_from": "LoRA", "delta": [{"name": "dora", "config": {"r": 16, "alpha": 32, "targets": "all-linear"}}],
             "lrs": LOW_LR, "needs": ["dora"]},
    "VeRA": {"base_from": "LoRA", "delta": [{"name": "vera", "config": {"r": 256, "targets": "all-linear"}}],
             "lrs": HIGH_LR, "needs": ["vera"]},
    "(IA)³": {"base_from": "LoRA", "delta": [{"name": "ia3", "config": {}}], "lrs": HIGH_LR, "needs": ["ia3"]},
    "BitFit": {"base_from": "LoRA", "delta": [{"name": "bitfit", "config": {"targets": "all-linear", "add_missing": "auto"}}],
               "lrs": MID_LR, "needs": ["bitfit"]},
    "AdapterH": {"base_from": "LoRA", "delta": [{"name": "adapter", "config": {"placement": "houlsby", **ADAPTER_SIZE}}],
                 "lrs": LOW_LR, "needs": ["adapter"]},
    "AdapterP": {"base_from": "LoRA", "delta": [{"name": "adapter", "config": {"placement": "pfeiffer", **ADAPTER_SIZE}}],
                 "lrs": LOW_LR, "needs": ["adapter"]},
    "Parallel adapter": {"base_from": "LoRA",
                         "delta": [{"name": "adapter", "config": {"placement": "parallel", **ADAPTER_SIZE}}],
                         "lrs": LOW_LR, "needs": ["adapter"]},
    "Prefix-tuning": {"base_from": "LoRA", "delta": [{"name": "prefix_tuning", "config": {"num_virtual_tokens": 20}}],
                      "lrs": HIGH_LR, "needs": ["prefix_tuning"]},
    "Prompt tuning": {"base_from": "LoRA", "delta": [{"name": "prompt_tuning", "config": {"num_virtual_tokens": 20}}],
                      "lrs": HIGH_LR, "needs": ["prompt_tuning"]},
    "P-tuning": {"base_from": "LoRA", "delta": [{"name": "p_tuning", "config": {"num_virtual_tokens": 20}}],
                 "lrs": MID_LR, "needs": ["prompt_tuning"]},
    "LoRA + BitFit": {"base_from": "LoRA", "delta": [LORA, {"name": "bitfit", "config": {"targets": "all-linear",
                                                                                          "add_missing": "auto"}}],
                      "lrs": LOW_LR, "needs": ["lora", "bitfit"]},
    "Prefix + LoRA": {"base_from": "LoRA", "delta": [{"name": "prefix_tuning", "config": {"num_virtual_tokens": 20}}, LORA],
                      "lrs": LOW_LR, "needs": ["lora", "prefix_tuning"]},
    "AdapterH + BitFit": {"base_from": "LoRA",
                          "delta": [{"name": "adapter", "config": {"placement": "houlsby", **ADAPTER_SIZE}},
                                    {"name": "bitfit", "config": {"targets": "all-linear", "add_missing": "auto"}}],
                          "lrs": LOW_LR, "needs": ["adapter", "bitfit"]},
    "QLoRA": {"delta": [LORA], "quantizer": {"name": "nf4", "config": {"compute_dtype": "bf16"}}, "lrs": LOW_LR, "needs": ["lora", "nf4"]},
    "LOMO": {"base_from": "LoRA", "delta": [], "optimizer": {"name": "lomo", "config": {"clip_grad_norm": 1.0,
                                                                                          "warmup_steps": 10}},
             "lrs": HIGH_LR, "needs": ["lomo"]},
    "AdaLomo": {"base_from": "LoRA", "delta": [], "optimizer": {"name": "adalomo", "config": {"warmup_steps": 10}},
                "lrs": (1.0e-4, 3.0e-4, 1.0e-3), "needs": ["adalomo"]},
}
"""Every method and useful combination, each with its three-value learning-rate sweep; the full run
uses the middle value until a sweep (``--sweep``) has chosen the best on the validation split."""
SWEEP_STEPS = 50
"""Steps of each sweep run (a short run of the same data, batch size and schedule)."""


def installed() -> set[str]:
    """Names of the installed plugins (every kind)."""
    out = subprocess.run([sys.executable, "-m", "deltatune.cli.main", "plugins", "--json"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return {p["name"] for p in json.loads(out)["installed"]}


def method_config(method: dict, lr: float, steps: int | None, root: Path, humaneval: bool = False,
                  sweep: bool = False) -> dict:
    """The demo configuration with ``method`` in place of LoRA at learning rate ``lr`` (a whole file:
    jsonargparse does not merge a plugin reference across two --config files reliably), with HumanEval
    when asked; a ``sweep`` run measures only the validation loss of the tuned model."""
    config = yaml.safe_load(DEMO.read_text())
    model = config["model"]
    if humaneval:
        model["evaluators"].append(HUMANEVAL)
    if sweep:
        model["evaluators"] = [e for e in model["evaluators"] if e["name"] == "perplexity"]
    # bf16, as `auto` computes on a CPU with bf16 products (where the table was measured): a CPU without
    # them would otherwise train in fp32, whose rows are not comparable with the others
    model.update(delta=method["delta"], quantizer=method.get("quantizer"), samples=0, base_dtype="bf16",
                 compare_base="base_from" not in method and not sweep,
                 overwrite=True)  # the run folders under --out are this benchmark's own
    optimizer = json.loads(json.dumps(method.get("optimizer") or {"name": "adamw", "config": {"warmup_steps": 10}}))
    optimizer["config"]["lr"] = lr
    model["optimizer"] = optimizer
    config["trainer"]["default_root_dir"] = str(root)
    if steps:
        config["trainer"]["max_steps"] = steps
    return config


def fit(config: dict, stem: str, out: Path) -> dict:
    """Run ``deltatune fit`` on ``config`` (written to ``<out>/<stem>.yaml``); its report as a dict with
    the wall time and the process's peak RSS, or ``{"error": ...}``."""
    path = out / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = out / f"{stem}.log"
    start = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen([sys.executable, "-m", "deltatune.cli.main", "fit", "--config", str(path)],
                                 cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": log.read_text().strip().splitlines()[-1][:200], "wall": wall}
    report = json.loads((Path(config["trainer"]["default_root_dir"]) / "report.json").read_text())
    report.update(wall=wall, peak_rss_kib=usage.ru_maxrss)
    return report


def run(name: str, method: dict, steps: int | None, out: Path, humaneval: bool = False) -> dict:
    """Train one method at its chosen learning rate (:func:`chosen_lr`); its report plus the wall time."""
    stem = slug(name)
    lr = chosen_lr(name)
    report = fit(method_config(method, lr, steps, out / stem, humaneval), stem, out)
    report["lr"] = lr
    if "error" not in report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{stem}.result.json").write_text(json.dumps(report))
    return report


def slug(name: str) -> str:
    """The file-name stem of method ``name`` (``"LoRA + BitFit"`` → ``lora-plus-bitfit``)."""
    name = name.lower().replace("³", "3").replace("+", " plus ")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def sweep(name: str, method: dict, out: Path, steps: int = SWEEP_STEPS) -> list[dict]:
    """Short runs of ``name`` measuring the tuned model's validation loss, each saved as
    ``RESULTS/sweep/<slug>-<lr>.json``: at each of its learning rates (``method["lrs"]``) not measured yet,
    then, while the lowest loss lies at an end of the rates measured, at the next rate of the 1-3-10
    ladder beyond that end (at most :data:`SWEEP_EXTENSIONS` more), so that the rate chosen is a minimum
    the sweep brackets. A saved run is reused (delete its file to measure it again)."""
    folder, saved = out / "sweep", RESULTS / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    saved.mkdir(parents=True, exist_ok=True)

    def measure(lr: float) -> None:
        stem = f"{slug(name)}-{lr:g}"
        if (saved / f"{stem}.json").is_file():
            return
        report = fit(method_config(method, lr, steps, folder / stem, sweep=True), stem, folder)
        if "error" in report:
            print(json.dumps({"method": name, "lr": lr, "error": report["error"]}), flush=True)
            return
        entry = {"lr": lr, "steps": steps, "val_loss": report["tuned_metrics"]["validation"]["perplexity/loss"],
                 "parameters": report.get("parameters", {})}
        (saved / f"{stem}.json").write_text(json.dumps(entry))
        print(json.dumps({"method": name, **entry}), flush=True)

    for lr in method["lrs"]:
        measure(lr)
    for _ in range(SWEEP_EXTENSIONS):
        runs = sorted((r for r in sweep_results(name) if math.isfinite(r.get("val_loss", math.nan))),
                      key=lambda r: r["lr"])
        if len(runs) < 2:
            break
        best = min(range(len(runs)), key=lambda i: runs[i]["val_loss"])
        if 0 < best < len(runs) - 1:
            break
        measure(ladder(runs[best]["lr"], up=best > 0))
    return sweep_results(name)


SWEEP_EXTENSIONS = 3
"""Learning rates a sweep may add beyond its three when its best lies at an end."""


def ladder(lr: float, up: bool) -> float:
    """The next learning rate above (or below) ``lr`` on the 1-3-10 ladder (1e-3, 3e-3, 1e-2, ...)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    rungs = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    beyond = [r for r in rungs if r > lr * 1.01] if up else [r for r in rungs if r < lr / 1.01]
    return float(f"{(min(beyond) if up else max(beyond)):.1g}")


def sweep_results(name: str) -> list[dict]:
    """The saved sweep runs of ``name`` (its learning rates and any the sweep added), by learning rate."""
    prefix = f"{slug(name)}-"
    runs = []
    for path in (RESULTS / "sweep").glob(f"{prefix}*.json"):
        try:
            float(path.stem[len(prefix):])  # "lora-0.001", not "lora-plus-bitfit-0.001"
        except ValueError:
            continue
        runs.append(json.loads(path.read_text()))
    return sorted(runs, key=lambda r: r["lr"])


def chosen_lr(name: str) -> float:
    """The learning rate of ``name`` with the lowest validation loss in its sweep, or the middle one of
    its sweep values when no sweep ran."""
    measured = [r for r in sweep_results(name) if "val_loss" in r and math.isfinite(r["val_loss"])]
    if measured:
        return min(measured, key=lambda r: r["val_loss"])["lr"]
    return METHODS[name]["lrs"][1]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation of paired ``xs`` and ``ys`` (average ranks for ties)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / spread if spread else float("nan")


def reevaluate(name: str, out: Path) -> dict:
    """Evaluate the saved run of ``name`` again (base where the run measured it, and tuned) and update
    ``<name>.result.json``; a run that was never saved is reported as missing, not measured."""
    import torch
    from deltatune.io.adapter import load_adapter, read_manifest, spec_from_manifest
    from deltatune.plugin.resolve import PluginRef, resolve
    from deltatune.data.module import InstructionDataModule
    from deltatune.evaluation.helpers import EvaluatorRef
    from deltatune.model.assembly import build_model, resolve_spec

    stem = slug(name)
    adapter, config_file, result_file = out / stem / "adapter", out / f"{stem}.yaml", RESULTS / f"{stem}.result.json"
    if not (adapter.is_dir() and config_file.is_file() and result_file.is_file()):
        return {"error": f"no saved run to re-evaluate ({out.name}/{stem}/adapter, .yaml or .result.json missing)",
                "missing": True}
    config = yaml.safe_load(config_file.read_text())
    datamodule = InstructionDataModule(**config["data"], base=config["model"]["base"])
    datamodule.setup()
    refs = [EvaluatorRef.model_validate(e) for e in config["model"]["evaluators"]]
    evaluators = [(resolve("evaluator", PluginRef(name=e.name, config=e.config)), e.splits) for e in refs]

    def evaluate(model) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Every evaluator on every evaluation set it covers, as DeltaTuneModule.evaluate_sets does."""
        model.eval()
        metrics, seconds = {}, {}
        with torch.no_grad():
            for split in datamodule.eval_splits():
                start = time.perf_counter()
                for evaluator, splits in evaluators:
                    if splits is None or split in splits:
                        result = evaluator.plugin.evaluate(model, datamodule.tokenizer, datamodule.rows(split),
                                                           evaluator.cfg)
                        metrics.setdefault(split, {}).update({f"{evaluator.name}/{k}": float(v)
                                                              for k, v in result.items()})
                seconds[split] = round(time.perf_counter() - start, 1)
        return metrics, seconds

    report = json.loads(result_file.read_text())
    report.setdefault("fit_metrics", {"base": report["base_metrics"], "tuned": report["tuned_metrics"]})
    timings = {}
    if config["model"].get("compare_base", True):
        # the run's own model before training: same spec, delta methods at their initialisation
        untrained = build_model(resolve_spec(spec_from_manifest(read_manifest(adapter))))
        report["base_metrics"], timings["base"] = evaluate(untrained)
        del untrained
    else:
        report["base_metrics"] = {}
    model, _ = load_adapter(adapter)
    report["tuned_metrics"], timings["tuned"] = evaluate(model)
    report["reevaluated"] = {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "eval_s": timings,
                             "rows": {s: len(datamodule.rows(s)) for s in datamodule.eval_splits()}}
    result_file.write_text(json.dumps(report))
    return report


def previous(name: str) -> dict | None:
    """The result of an earlier full run of ``name`` (kept by ``--only`` runs of other methods)."""
    path = RESULTS / f"{slug(name)}.result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cell(report: dict, split: str, metric: str = "exact_match/accuracy") -> str:
    """``base → tuned (±points)`` of ``metric`` (exact match) on ``split``."""
    base = report["base_metrics"].get(split, {}).get(metric)
    tuned = report["tuned_metrics"].get(split, {}).get(metric)
    rows = [report[k].get(split, {}).get(f"{metric.split('/')[0]}/rows") for k in ("base_metrics", "tuned_metrics")]
    if None not in rows and rows[0] != rows[1]:  # e.g. a shared base measured on a split that has changed since
        return f"— (base on {rows[0]:.0f} rows, tuned on {rows[1]:.0f})"
    if base is None or tuned is None:
        return "—"
    return f"{100 * base:.1f}% → **{100 * tuned:.1f}%** ({100 * (tuned - base):+.1f})"


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of ``gained`` against ``lost`` paired outcomes."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def humaneval_cell(report: dict) -> str:
    """HumanEval pass@1 ``base → tuned (±points)`` with the problems gained and lost and the sign test's p."""
    text = cell(report, "test", HUMANEVAL_METRIC)
    prefix = "humaneval/passed.chat."
    base, tuned = (report[k].get("test", {}) for k in ("base_metrics", "tuned_metrics"))
    problems = [k for k in tuned if k.startswith(prefix)]
    if text == "—" or not problems or not all(k in base for k in problems):
        return text
    gained = sum(base[k] == 0 and tuned[k] == 1 for k in problems)
    lost = sum(base[k] == 1 and tuned[k] == 0 for k in problems)
    return f"{text}; +{gained} −{lost} of {len(problems)}, p = {sign_test(gained, lost):.2g}"


def share_base(results: dict[str, dict]) -> None:
    """Give methods that start from the dense base the base figures the LoRA run measured."""
    for name, report in results.items():
        source = results.get(METHODS[name].get("base_from", ""), {})
        if "error" not in report and source.get("base_metrics"):
            report["base_metrics"] = source["base_metrics"]


HELDOUT_NOTE = ("What the held-out figures measure: `exact_match` compares answers case-folded, so an `uppercase` "
                "row counts when the phrase comes back in any case: a gain there is for giving back the words in "
                "order, not necessarily for upper-casing.")


def heldout_families(results: dict[str, dict]) -> tuple[int, list[str]]:
    """Rows of the held-out set and its families, as the evaluations report them."""
    for report in results.values():
        metrics = report.get("tuned_metrics", {}).get("heldout", {})
        if "exact_match/rows" in metrics:
            prefix = "exact_match/accuracy."
            return int(metrics["exact_match/rows"]), sorted(k[len(prefix):] for k in metrics if k.startswith(prefix))
    return 0, []


def family_table(results: dict[str, dict], families: list[str]) -> list[str]:
    """Held-out exact match per family, base → tuned, one row per method."""
    lines = ["| method | " + " | ".join(f"heldout `{f}`" for f in families) + " |",
             "|---|" + "---|" * len(families)]
    for name, report in results.items():
        if "error" not in report:
            cells = [cell(report, "heldout", f"exact_match/accuracy.{f}") for f in families]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def heldout_verdict(results: dict[str, dict], families: list[str], per_family: int) -> list[str]:
    """Which methods fall below their base on the held-out families (by how many rows of which family),
    and which families no model answers at all."""
    def score(report: dict, which: str, family: str) -> float:
        return report[which].get("heldout", {}).get(f"exact_match/accuracy.{family}", 0.0)

    kinds = ("base_metrics", "tuned_metrics")
    measured = {n: r for n, r in results.items() if "error" not in r and all(
        r[k].get("heldout", {}).get("exact_match/rows") == per_family * len(families) for k in kinds)}
    below = []
    for name, report in measured.items():
        base, tuned = (report[k]["heldout"]["exact_match/accuracy"] for k in kinds)
        if tuned < base:
            drops = [f"`{f}` {round(per_family * score(report, 'base_metrics', f))} → "
                     f"{round(per_family * score(report, 'tuned_metrics', f))} of {per_family} rows"
                     for f in families if score(report, "tuned_metrics", f) < score(report, "base_metrics", f)]
            below.append(f"{name} ({'; '.join(drops)})")
    text = [("Below its base on the held-out families: " + ", ".join(below) + "." if below else
             "No method falls below its base on the held-out families.")]
    dead = [f for f in families if not any(score(r, k, f) for r in measured.values() for k in kinds)]
    if dead:
        text.append(f"No model, base or tuned, answers any {', '.join(f'`{f}`' for f in dead)} row exactly, so "
                    f"{'that family shows' if len(dead) == 1 else 'those families show'} no movement either way.")
    return [" ".join(text)]


def reproduction(results: dict[str, dict]) -> str:
    """How closely the re-evaluated runs give back what ``fit`` reported on the splits that did not change."""
    def value(metrics: dict, split: str, metric: str) -> float:
        return metrics.get(split, {}).get(metric, float("nan"))

    runs = {n: r for n, r in results.items() if "reevaluated" in r}
    if not runs:
        return ""
    differ = [n for n, r in runs.items() if value(r["fit_metrics"]["tuned"], "test", "exact_match/accuracy")
              != value(r["tuned_metrics"], "test", "exact_match/accuracy")]
    loss = max(abs(value(r["fit_metrics"]["tuned"], "validation", "perplexity/loss")
                   - value(r["tuned_metrics"], "validation", "perplexity/loss")) for r in runs.values())
    return (f"The tuned test exact match comes out as `fit` reported it for "
            f"{'every method' if not differ else 'all but ' + ', '.join(differ)}, and the tuned validation loss "
            f"within {loss:.1e} of it (bf16 compute){'' if differ else ': the saved runs load back faithfully'}.")


def step_seconds(report: dict) -> float | None:
    """Training-loop seconds per step of a run's report."""
    train, steps = report.get("timings", {}).get("train_s"), report.get("steps")
    return train / steps if train and steps else None


def ranking(results: dict[str, dict]) -> list[str]:
    """Whether validation loss ranks the methods as exact match does (Spearman's ρ over the rows)."""
    text = []
    for split in ("test", "heldout"):
        pairs = [(-r["tuned_metrics"]["validation"]["perplexity/loss"], r["tuned_metrics"][split]["exact_match/accuracy"])
                 for r in results.values() if "error" not in r
                 and "perplexity/loss" in r["tuned_metrics"].get("validation", {})
                 and "exact_match/accuracy" in r["tuned_metrics"].get(split, {})]
        if len(pairs) >= 3:
            rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
            text.append(f"Spearman's ρ between lower validation loss and higher exact match on `{split}`, over the "
                        f"{len(pairs)} rows: **{rho:+.2f}**.")
    return [" ".join(text)] if text else []


def sweep_table(results: dict[str, dict]) -> list[str]:
    """Each method's validation loss at its sweep learning rates, and which methods are sensitive to it."""
    lines, sensitive, steps = [], [], None
    for name in results:
        runs = [r for r in sweep_results(name) if "val_loss" in r]
        if len(runs) < 2:
            continue
        steps = runs[0]["steps"]
        losses = [r["val_loss"] for r in runs]
        best = min(losses)
        spread = (max(losses) - best) / best
        if spread > 0.1:
            sensitive.append(name)
        cells = " · ".join(f"{r['lr']:g}: " + (f"**{r['val_loss']:.3f}**" if r["val_loss"] == best else f"{r['val_loss']:.3f}")
                           for r in runs)
        lines.append(f"| {name} | {cells} | {100 * spread:.0f}% |")
    if not lines:
        return []
    return [f"Learning-rate sweep ({steps} steps per run, same data, batch size and schedule; validation loss of the "
            "tuned model, the lowest in bold and used above; spread: (worst − best) / best):", "",
            "| method | lr: validation loss | spread |", "|---|---|---:|", *lines, "",
            ("Sensitive to the learning rate (spread over 10%): " + ", ".join(sensitive) + "." if sensitive else
             "No method's validation loss moves by more than 10% across its learning rates.")]


def table(results: dict[str, dict], missing: list[str], steps: int | None) -> str:
    """The markdown section for docs/benchmarks.md."""
    share_base(results)
    rows, families = heldout_families(results)
    reevaluated = [r["reevaluated"] for r in results.values() if "reevaluated" in r]
    lines = [BEGIN, "## Delta methods and combinations on the task suite (SmolLM2-135M-Instruct)", "",
             f"Command: `flock -x /tmp/deltatune-cpu.lock python benchmarks/methods.py --sweep --write"
             f"{f' --steps {steps}' if steps else ''}` (CPU, 2 cores). Every method gets the demo's budget "
             "(`examples/lora-smollm2.yaml`: same data, batch size 8, same steps, same evaluation); only the "
             "method and its learning rate change, the learning rate chosen per method by a sweep of three values "
             "(extended where the best lay at an end) "
             "on the validation split (`--sweep`, below), never on test. Peak RSS is the whole run's (loading, "
             "training, evaluation and generation). `test`: the six trained "
             "task families on problems never seen (96 rows); `heldout`: two task families never trained on"
             + (f" ({rows} rows: {', '.join(f'`{f}`' for f in families)}, {rows // max(len(families), 1)} each)"
                if rows else "")
             + "."]
    if reevaluated:
        lines += ["", "The figures are a re-evaluation of the same trained runs (same adapters, same budget; the "
                  "steps and times are those of training): `flock -x /tmp/deltatune-cpu.lock python "
                  "benchmarks/methods.py --reevaluate --only METHOD… --write` loads each run's saved adapter "
                  "(LOMO: its saved full model) and runs the run's own evaluators again on the current splits, "
                  "base and tuned, last on " + max(r["at"] for r in reevaluated) + ". " + reproduction(results)]
    lines += ["", "| method | trainable (% of base) | lr | peak RSS | s/step (× LoRA) | val loss | exact match, test "
              "| exact match, heldout | HumanEval pass@1 (chat) |",
              "|---|---:|---:|---:|---:|---:|---|---|---|"]
    lora_step = step_seconds(results.get("LoRA", {}))
    for name, report in results.items():
        if "error" in report:
            lines.append(f"| {name} | {'not measured' if report.get('missing') else 'failed'}: {report['error']} "
                         "| | | | | | | |")
            continue
        loss = report["tuned_metrics"].get("validation", {}).get("perplexity/loss", float("nan"))
        params = report.get("parameters", {})
        share = f"{params['trainable']:,} ({100 * params['trainable'] / params['total']:.2f}%)" if params.get("total") else "—"
        step = step_seconds(report)
        ratio = f"{step:.2f} ({step / lora_step:.2f}×)" if step and lora_step else "—"
        peak = report.get("peak_rss_kib")
        lines.append(f"| {name} | {share} | {report.get('lr', float('nan')):g} | "
                     f"{f'{peak / 2**20:.2f} GiB' if peak else '—'} | {ratio} | {loss:.3f} | {cell(report, 'test')} | "
                     f"{cell(report, 'heldout')} | {humaneval_cell(report)} |")
    lines += ["", *ranking(results)]
    if (sweeps := sweep_table(results)):
        lines += ["", *sweeps]
    lines += ["", "QLoRA's base is the 4-bit (NF4) model, measured on its own; every other method starts from the "
              "same dense model, whose figures the LoRA run measured once. Trainable: the parameters the method "
              "trains, as a share of the base model's. lr: the learning rate of the sweep with the lowest "
              "validation loss. Peak RSS: the whole process of the full run (model loading, training, "
              "evaluation and generation). s/step: the full run's "
              "training loop time per step, and its ratio to LoRA's; every run ran alone on the machine, one "
              "after the other.",
              "", "HumanEval: greedy pass@1 on OpenAI's 164 problems, chat mode (the model is asked for the completed "
              "function; docs/data-and-evaluation.md), `—` where a run did not measure it; +gained −lost counts "
              "the problems the tuned model solves and its base did not, and the reverse, with the two-sided exact "
              "sign test's p over those problems."]
    if families:
        lines += ["", "Held-out exact match per family (base → tuned):", "", *family_table(results, families),
                  "", *heldout_verdict(results, families, rows // len(families))]
    demo = results.get("LoRA", {})
    if demo.get("timings"):
        t = demo["timings"]
        lines += ["", f"The LoRA row is `make demo` (`examples/lora-smollm2.yaml`, less its 4 sample generations): "
                  f"{demo['wall']:.0f} s in all — base evaluation {t['base_eval_s']:.0f} s, training "
                  f"{t['train_s']:.0f} s ({demo['steps']} steps), tuned evaluation {t['tuned_eval_s']:.0f} s"
                  + (" (with the held-out split the run had then)." if "reevaluated" in demo else ".")]
        if (seconds := demo.get("reevaluated", {}).get("eval_s", {})) and "heldout" in seconds.get("base", {}):
            lines[-1] += (f" In the re-evaluation, exact match on the {rows} held-out rows took "
                          f"{seconds['base']['heldout']:.0f} s on the base and {seconds['tuned']['heldout']:.0f} s "
                          "on the tuned model; the demo runs both.")
    if {"uppercase", "count"} <= set(families):
        lines += ["", HELDOUT_NOTE]
    if missing:
        lines += ["", f"Not measured (plugin not installed when this ran): {', '.join(missing)}."]
    if (pending := [name for name in METHODS if name not in results and not any(m.startswith(name + " (") for m in missing)]):
        lines += ["", f"Full run not measured yet (its sweep is below): {', '.join(pending)}; "
                  "`python benchmarks/methods.py --only METHOD… --write` adds it."]
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
    parser.add_argument("--no-humaneval", action="store_true", help="do not measure HumanEval pass@1")
    parser.add_argument("--rewrite", action="store_true", help="run nothing: rebuild the table from the last results")
    parser.add_argument("--reevaluate", action="store_true",
                        help="train nothing: evaluate the saved runs again on the current splits, base and tuned")
    parser.add_argument("--sweep", action="store_true", help=f"first run each method's learning-rate sweep "
                        f"({SWEEP_STEPS}-step runs, validation loss only), then the full run at the best rate")
    parser.add_argument("--sweep-only", action="store_true", help="run the sweeps only")
    parser.add_argument("--sweep-steps", type=int, default=SWEEP_STEPS, help="steps of each sweep run")
    args = parser.parse_args()
    have = installed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, missing = {}, []
    for name, method in METHODS.items():
        if args.rewrite or (args.only and name not in args.only):
            if (earlier := previous(name)) is not None:
                results[name] = earlier
            continue
        if not set(method["needs"]) <= have:
            missing.append(f"{name} (needs {', '.join(sorted(set(method['needs']) - have))})")
            continue
        print(f"{name} …", flush=True)
        if args.sweep or args.sweep_only:
            sweep(name, method, out, args.sweep_steps)
            if args.sweep_only:
                continue
        humaneval = "humaneval" in have and not args.no_humaneval
        results[name] = reevaluate(name, out) if args.reevaluate else run(name, method, args.steps, out, humaneval)
        print(json.dumps({k: results[name].get(k) for k in ("tuned_metrics", "timings", "wall", "error")}), flush=True)
        if args.write:  # after every method, so an interrupted run keeps what it measured
            write_section(table(results, missing, args.steps))
    text = table(results, missing, args.steps)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
