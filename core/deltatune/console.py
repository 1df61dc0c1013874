"""Rich terminal output: run summaries, result tables, plugin listings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

if TYPE_CHECKING:
    from .config import ResolvedPlugin
    from .pipeline import ResolvedSpec
    from .report import RunReport

console = Console()


def _plugin_text(plugin: "ResolvedPlugin") -> str:
    options = plugin.cfg.model_dump(exclude_defaults=True)
    return plugin.name + (f" {options}" if options else "")


def print_run_summary(resolved: "ResolvedSpec", optimizer: "ResolvedPlugin", trainable: int, total: int) -> None:
    """A panel saying what is trained how."""
    if resolved.full_finetune:
        method = "[bold]none — full fine-tuning: every parameter trains[/bold]"
    else:
        method = " + ".join(_plugin_text(d) for d in resolved.deltas)
    lines = [
        f"base:       {resolved.spec.base}",
        f"quantizer:  {_plugin_text(resolved.quantizer) if resolved.quantizer else 'none'}",
        f"delta:      {method}",
        f"optimizer:  {_plugin_text(optimizer)}",
        f"trainable:  {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)",
    ]
    console.print(Panel("\n".join(lines), title="deltatune run", expand=False))


def print_report(report: "RunReport") -> None:
    """Base vs tuned metrics, then sample generations."""
    table = Table(title="validation: base vs tuned")
    for column in ("metric", "base", "tuned", "change"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key, tuned in report.tuned_metrics.items():
        if key.endswith("/tokens"):
            continue
        base = report.base_metrics.get(key)
        change = f"{tuned - base:+.4f}" if base is not None else ""
        table.add_row(key, f"{base:.4f}" if base is not None else "—", f"{tuned:.4f}", change)
    console.print(table)
    if report.tuned_samples:
        samples = Table(title="sample generations", show_lines=True)
        for column in ("prompt", "reference", "base", "tuned"):
            samples.add_column(column, overflow="fold")
        base = {p: out for p, _, out in report.base_samples}
        for prompt, reference, out in report.tuned_samples:
            samples.add_row(_short(prompt), reference, base.get(prompt, "—"), out)
        console.print(samples)
    console.print(f"adapter written to [bold]{report.adapter}[/bold] after {report.steps} steps")


def _short(prompt: str, limit: int = 160) -> str:
    """The end of a prompt (chat templates put boilerplate first)."""
    text = prompt.replace("<|im_start|>", "").replace("<|im_end|>", "").strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A simple table."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    console.print(table)


def print_mix(parts: list[tuple[str, float, int]], mixed: list[Any]) -> None:
    """How a training mix was drawn: ``(builder, weight, rows available)`` per dataset."""
    whole = sum(w for _, w, _ in parts)
    rows = [[name, f"{w:g}", f"{100 * w / whole:.1f}%", available] for name, w, available in parts]
    print_table(f"training mix: {len(mixed)} rows", ["dataset", "weight", "share", "rows available"], rows)
