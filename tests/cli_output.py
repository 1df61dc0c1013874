"""Reading what a ``deltatune`` command printed, for tests that run it in-process."""

from __future__ import annotations

import pytest


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The one ``error:`` line of the command's output (errors go to stderr)."""
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]
