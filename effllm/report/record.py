"""A run's record, `run.json`: provenance, and each notebook's status, parameters, wall time and error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effllm.files import atomic_write_text


def order(stem: str) -> tuple[bool, str]:
    """Report order: by name, with `*summary` notebooks last."""
    return stem.endswith("summary"), stem


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    """The run record of `run_dir`, or an empty one when the run has not happened yet."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return {"notebooks": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to start the run afresh") from e


def write_run_json(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write the run record atomically, notebooks in report order."""
    notebooks = {s: record["notebooks"][s] for s in sorted(record["notebooks"], key=order)}
    text = json.dumps({**record, "notebooks": notebooks}, indent=2, default=str) + "\n"
    return atomic_write_text(Path(run_dir) / "run.json", text)
