"""``deltatune estimate``: memory planning before buying hardware (being written)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``estimate`` to the ``deltatune`` command's subparsers."""
    parser = sub.add_parser("estimate", help="estimate parameters and peak memory per device")
    parser.set_defaults(func=lambda args: None)
