"""Helpers shared by the benchmark scripts: resident memory of this process, and their docs sections.

Imported by scripts run as ``python benchmarks/<script>.py`` (the script's folder is on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path


def status_kib() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in KiB."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.M)}


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def trim() -> None:
    """Collect garbage and hand freed heap back to the system, so RSS reflects live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_child(name: str, cmd: list[str], cwd: Path) -> dict:
    """Run one configuration in a fresh process; its result is the JSON object on its last stdout line."""
    print(f"running {name} …", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def write_section(text: str, path: Path, begin: str, end: str) -> None:
    """Replace the part of ``path`` from ``begin`` to ``end`` by ``text`` (or append ``text``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        _, tail = rest.split(end, 1)
        updated = head + text + tail
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(updated)


def publish(text: str, path: Path, write: bool, begin: str, end: str) -> None:
    """Print a benchmark's docs section and, with ``write``, put it into ``path`` between the markers."""
    print(text)
    if write:
        write_section(text, path, begin, end)
        print(f"\nwrote {path}")


def machine() -> str:
    """The CPU, its core count and bf16 ISA flags, memory, torch and Python versions."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    memory = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    return (f"{model}, {os.cpu_count()} cores ({', '.join(isa) or 'no bf16 ISA flags'}), {memory // 1024} GiB; "
            f"torch {torch.__version__}, Python {platform.python_version()}")
