"""``deltatune report RUN_DIR…``: print a finished run's report (several side by side) and plot losses."""

from __future__ import annotations

from pathlib import Path
from typing import Any



def cmd_report(args: Any) -> None:
    """``deltatune report RUN_DIR…``: print one run's table (several runs side by side) and plot losses."""
    from deltatune.train.report import PLOT_FILE, RunReport, plot_losses
    from deltatune.ui import console

    reports = [RunReport.read(Path(p)) for p in args.runs]
    if len(reports) == 1:
        console.print_report(reports[0])
        plot = Path(args.plot) if args.plot else Path(args.runs[0]) / PLOT_FILE
        if not args.plot and plot.is_file():  # the run's own plot, written by fit, is never rewritten
            console.console.print(f"loss plot: [bold]{plot}[/bold]")
            return
    else:
        names = [r.name for r in reports]
        for report, path in zip(reports, args.runs):
            if names.count(report.name) > 1:
                report.name = str(path)
        console.print_comparison(reports)
        plot = Path(args.plot or "runs-compared.png")
    console.console.print(f"loss plot written to [bold]{plot_losses(reports, plot)}[/bold]")


def add_parser(sub: Any) -> None:
    """Add the ``report`` subcommand to the ``deltatune`` command's subparsers."""
    parser = sub.add_parser("report", help="print and plot a finished run, or compare several side by side")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding report.json")
    parser.add_argument("--plot", help="PNG to write (default: RUN_DIR/losses.png when the run has none, runs-compared.png for several)")
    parser.set_defaults(func=cmd_report)
