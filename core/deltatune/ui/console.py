"""Rich terminal output: run summaries, result tables, plugin listings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

if TYPE_CHECKING:
    from deltatune.plugin.resolve import ResolvedPlugin
    from deltatune.model.assembly import ResolvedSpec
    from deltatune.train.report import RunReport

console = Console()
errors = Console(stderr=True, soft_wrap=True, highlight=False)
"""Errors and warnings go to stderr, one line each."""


def print_error(message: str) -> None:
    """``error: <message>`` on stderr."""
    errors.print(f"[bold red]error:[/bold red] {escape(message)}")


def print_warning(message: str) -> None:
    """``warning: <message>`` on stderr."""
    errors.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}")


def _plugin_text(plugin: "ResolvedPlugin") -> str:
    options = plugin.cfg.model_dump(exclude_defaults=True)
    return plugin.name + (f" {options}" if options else "")


def method_text(resolved: "ResolvedSpec") -> str:
    """The quantizer and delta methods of a run in one line (``nf4 + lora {'r': 16}``)."""
    parts = ([_plugin_text(resolved.quantizer)] if resolved.quantizer else []) + [_plugin_text(d) for d in resolved.deltas]
    return " + ".join(parts) or "full fine-tuning"


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


def is_count(metric: str) -> bool:
    """Whether ``metric`` is a row or token count rather than a score (not shown as a score)."""
    return metric.rsplit("/", 1)[-1] in ("tokens", "rows")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _change(base: float | None, tuned: float | None, metric: str) -> str:
    """``tuned - base``: in points for shares (accuracies, ROUGE: both values in 0–1, no loss), plain
    for the rest (losses, perplexities)."""
    if base is None or tuned is None:
        return ""
    if "loss" in metric or not (0 <= base <= 1 and 0 <= tuned <= 1):
        return f"{tuned - base:+.4f}"
    return f"{100 * (tuned - base):+.1f} pts"


def print_report(report: "RunReport") -> None:
    """Base vs tuned for every evaluation set and evaluator, then sample generations."""
    table = Table(title=f"{report.name or 'run'}: base vs tuned" if report.name else "base vs tuned")
    for column in ("set", "metric", "base", "tuned", "change"):
        table.add_column(column, justify="left" if column in ("set", "metric") else "right",
                         overflow="fold", no_wrap=column != "metric")
    for split, metric in report.metric_keys():
        base, tuned = report.value("base", split, metric), report.value("tuned", split, metric)
        table.add_row(split, metric, _fmt(base), _fmt(tuned), _change(base, tuned, metric))
    if table.rows:  # a run without evaluators has no table
        console.print(table)
    if report.tuned_samples:
        samples = Table(title="sample generations", show_lines=True)
        for column in ("prompt", "reference", "base", "tuned"):
            samples.add_column(column, overflow="fold")
        base = {p: out for p, _, out in report.base_samples}
        for prompt, reference, out in report.tuned_samples:
            samples.add_row(_short(prompt), reference, base.get(prompt, "—"), out)
        console.print(samples)
    facts = [f"{report.steps} steps"]
    if report.batches:
        facts.append(f"padding {100 * report.batches.get('padding', 0):.1f}% of training tokens")
    if report.timings:
        facts.append(", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in report.timings.items()))
    if report.adapter:
        facts.append(f"adapter written to [bold]{report.adapter}[/bold]")
    console.print("; ".join(facts))


def print_comparison(reports: list["RunReport"]) -> None:
    """Several runs side by side: one column per run, ``base → tuned`` for every set and metric."""
    table = Table(title="runs compared (base → tuned)")
    table.add_column("set")
    table.add_column("metric")
    for report in reports:
        table.add_column(report.name, justify="right")
    keys: dict[tuple[str, str], None] = {}
    for report in reports:
        keys.update(dict.fromkeys(report.metric_keys()))
    for split, metric in keys:
        cells = []
        for report in reports:
            base, tuned = report.value("base", split, metric), report.value("tuned", split, metric)
            cells.append(f"{_fmt(base)} → {_fmt(tuned)}" if base is not None else _fmt(tuned))
        table.add_row(split, metric, *cells)
    table.add_row("", "steps", *[str(r.steps) for r in reports])
    table.add_row("", "method", *[r.method or "—" for r in reports])
    console.print(table)


def print_metrics(title: str, metrics: dict[str, dict[str, float]]) -> None:
    """Metrics of one model (``validate``/``test``): evaluation set, metric, value."""
    rows = [[split, key, f"{value:.4f}"] for split, values in metrics.items()
            for key, value in values.items() if not is_count(key)]
    print_table(title, ["set", "metric", "value"], rows)


def print_batches(stats: dict[str, Any]) -> None:
    """One line on the shape of a training epoch (rows, packing, padding)."""
    packed = f" packed into {stats['rows']} rows" if stats["rows"] != stats["examples"] else ""
    console.print(f"training data: {stats['examples']} examples{packed}, {stats['batches']} batches per epoch, "
                  f"{stats['tokens']:,} tokens, padding {100 * stats['padding']:.1f}% of token slots")


def _short(prompt: str, limit: int = 160) -> str:
    """A sample's prompt (the user's text: :meth:`deltatune.train.module.DeltaTuneModule.sample`),
    its end when it is long."""
    text = prompt.strip()
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
