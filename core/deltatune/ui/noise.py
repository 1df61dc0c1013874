"""Silencing the lines Lightning and PyTorch print that say nothing about a deltatune run.

Only these known messages are filtered, each matched by its own text, so every other warning or log
line still shows: Lightning's LitLogger advert (a log record), its notice that ``tensorboardX`` is no
longer a dependency, its "No seed found" warning (deltatune seeds every run itself: ``data.seed``), and
the deprecation warning PyTorch raises for Lightning's use of ``LeafSpec``.
"""

from __future__ import annotations

import logging
import re
import warnings

KNOWN_WARNINGS = (
    r"No seed found, seed set to",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
"""Start of the text of each warning that is silenced."""
KNOWN_LOG_LINES = re.compile(r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]")
"""The log record that is dropped: Lightning's advert for its LitLogger."""
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""The loggers through which Lightning's ``rank_zero_info`` writes."""


def _drop_known_lines(record: logging.LogRecord) -> bool:
    return not KNOWN_LOG_LINES.match(record.getMessage())


def silence_known_noise() -> None:
    """Filter the known messages (idempotent) before Lightning prints them."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _drop_known_lines not in logger.filters:
            logger.addFilter(_drop_known_lines)
