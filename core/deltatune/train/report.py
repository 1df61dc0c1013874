"""The run report: what ``fit`` measured, written to ``report.json`` and plotted to ``losses.png``.

``base_metrics`` and ``tuned_metrics`` map each evaluation set (``validation``, ``test``, and every
``extra_eval`` set such as ``heldout``) to ``{"evaluator/metric": value}``. ``history`` holds the
training loss of every step and the validation loss of every validation run, for the plot.
``deltatune report RUN_DIR…`` (:mod:`deltatune.cli.report`) reads reports back, prints them and
compares several side by side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from deltatune.io.atomic import atomic_file
from deltatune.errors import DataError
from deltatune.ui.console import is_count

REPORT_FILE = "report.json"
PLOT_FILE = "losses.png"

Metrics = dict[str, dict[str, float]]
"""Evaluation set → ``{"evaluator/metric": value}``."""


@dataclass
class RunReport:
    """What ``fit`` measured, before and after training."""

    name: str = ""
    method: str = ""
    base_metrics: Metrics = field(default_factory=dict)
    tuned_metrics: Metrics = field(default_factory=dict)
    base_samples: list[tuple[str, str, str]] = field(default_factory=list)
    tuned_samples: list[tuple[str, str, str]] = field(default_factory=list)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"train": [], "validation": []})
    parameters: dict[str, int] = field(default_factory=dict)
    batches: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    adapter: str = ""
    steps: int = 0

    def write(self, path: Path) -> None:
        """Write the report as JSON, atomically."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "RunReport":
        """Read a report written by :meth:`write` (a run folder or the JSON file itself)."""
        path = Path(path)
        path = path / REPORT_FILE if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"no run report at {path}: is it a folder written by `deltatune fit`?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not a valid report ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not a valid report (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: not a valid report (expected a JSON object)")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("base_samples", "tuned_samples"):
            data[key] = [tuple(s) for s in data.get(key, [])]
        data["history"] = {k: [tuple(p) for p in v] for k, v in data.get("history", {}).items()}
        report = cls(**data)
        report.name = report.name or path.parent.name
        return report

    def metric_keys(self) -> list[tuple[str, str]]:
        """Every ``(evaluation set, metric)`` measured, in first-seen order, bookkeeping counts left out."""
        keys: dict[tuple[str, str], None] = {}
        for metrics in (self.base_metrics, self.tuned_metrics):
            for split, values in metrics.items():
                keys.update({(split, k): None for k in values if not is_count(k)})
        return list(keys)

    def value(self, which: str, split: str, metric: str) -> float | None:
        """A ``base`` or ``tuned`` figure, or ``None`` when it was not measured."""
        metrics = self.base_metrics if which == "base" else self.tuned_metrics
        return metrics.get(split, {}).get(metric)


def smooth(values: list[float] | tuple[float, ...], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, mean = [], 0.0
    for i, value in enumerate(values, start=1):
        mean = weight * mean + (1 - weight) * value
        out.append(mean / (1 - weight ** i))
    return out


def plot_losses(reports: list[RunReport], path: Path) -> Path:
    """Plot training loss (raw, faint; smoothed) and validation loss (markers) against the step, for
    every report, into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for index, report in enumerate(reports):
        color = f"C{index % 10}"
        label = report.name or f"run {index + 1}"
        train = report.history.get("train", [])
        if train:
            steps, losses = zip(*train)
            axes.plot(steps, losses, color=color, alpha=0.2, linewidth=1)
            axes.plot(steps, smooth(losses), color=color, linewidth=1.5, label=f"{label} train (smoothed)")
        validation = report.history.get("validation", [])
        if validation:
            axes.plot(*zip(*validation), color=color, marker="o", linewidth=2, label=f"{label} validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
