"""Fixtures of the fault-injection suite: the uninterrupted run every resumed run must match, and a
small tmpfs for the disk-full faults."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from faults.faultrun import adapter_tensors, fit


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of an uninterrupted ``fit`` (checkpoint, adapter, report); copy it before damaging it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = fit(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def uninterrupted(finished_run: Path) -> dict[str, torch.Tensor]:
    """The adapter every faulted-then-resumed run must reach exactly."""
    return adapter_tensors(finished_run)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (as root; skipped where mounting is not allowed): the kernel's own ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}): run as root for the disk-full tests")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
