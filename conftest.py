"""Repository-wide pytest set-up: the suite runs on two xdist workers (``-n 2 --dist loadgroup`` in
pyproject.toml: tests are spread one by one, those marked ``xdist_group(NAME)`` share a worker), one CPU
thread each, so the two workers share the cores instead of oversubscribing them; the processes a test
starts (fits, DDP ranks, sandboxed programs) inherit the setting."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
