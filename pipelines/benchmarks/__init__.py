"""Benchmarks: they print numbers and write JSON; they assert nothing (targets are checked by reading them)."""

import json
from pathlib import Path


def write_report(path: str | Path, report: dict) -> Path:
    """Write a benchmark's ``report`` as JSON at ``path`` (its folder made if needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
