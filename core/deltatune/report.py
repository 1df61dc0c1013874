"""The run report: base vs tuned metrics and samples, written to ``report.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_file


@dataclass
class RunReport:
    """What ``fit`` measured, before and after training."""

    base_metrics: dict[str, float] = field(default_factory=dict)
    tuned_metrics: dict[str, float] = field(default_factory=dict)
    base_samples: list[tuple[str, str, str]] = field(default_factory=list)
    tuned_samples: list[tuple[str, str, str]] = field(default_factory=list)
    adapter: str = ""
    steps: int = 0

    def write(self, path: Path) -> None:
        """Write the report as JSON, atomically."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "RunReport":
        """Read a report written by :meth:`write`."""
        data = json.loads(Path(path).read_text())
        for key in ("base_samples", "tuned_samples"):
            data[key] = [tuple(s) for s in data.get(key, [])]
        return cls(**data)
