"""Tidy results: one CSV per notebook, one row per measurement, written atomically.

A row holds the swept parameters as columns, then `metric`, `value` (float, NaN when the measurement
failed), `unit`, `status` (ok | oom | unsupported | error | skipped) and `reason` (empty when ok).
Notebooks write with `save`; the summary notebook only reads with `load`. Every file write in effllm
goes through `atomic_write_bytes`, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

REQUIRED = ("metric", "value", "unit")
COLUMNS = (*REQUIRED, "status", "reason")
STATUSES = ("ok", "oom", "unsupported", "error", "skipped")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory, fsync and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def row(
    metric: str, value: float | None, unit: str, status: str = "ok", reason: str = "", **params: Any
) -> dict:
    """One tidy measurement: the swept `params` as columns plus metric, value, unit, status, reason."""
    _check_status(status, where="row()")
    value = math.nan if value is None else float(value)
    return {**params, "metric": metric, "value": value, "unit": unit, "status": status, "reason": reason}


def save(rows: list[dict] | pd.DataFrame, name: str, results_dir: str | Path) -> Path:
    """Validate tidy `rows` and write them atomically to `<results_dir>/<name>.csv`."""
    if isinstance(rows, pd.DataFrame):
        df = rows.copy()
    else:
        for i, r in enumerate(rows):
            missing = [c for c in REQUIRED if c not in r]
            if missing:
                raise ValueError(
                    f"results {name!r}: row {i} has no {', '.join(missing)} ({r!r}); "
                    "build rows with effllm.results.row(metric, value, unit, **params)"
                )
        df = pd.DataFrame(list(rows))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"results {name!r}: missing column(s) {', '.join(missing)}; need {', '.join(COLUMNS)}"
        )
    df["status"] = df["status"].astype(object).fillna("ok") if "status" in df else "ok"
    df["reason"] = df["reason"].astype(object).fillna("") if "reason" in df else ""
    for i, status in enumerate(df["status"]):
        _check_status(status, where=f"results {name!r} row {i}")
    try:
        df["value"] = pd.to_numeric(df["value"]).astype(float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"results {name!r}: column 'value' must be numeric (NaN when failed): {e}") from e
    params = [c for c in df.columns if c not in COLUMNS]
    return atomic_write_text(_path(name, results_dir), df[params + list(COLUMNS)].to_csv(index=False))


def load(name: str, results_dir: str | Path) -> pd.DataFrame:
    """Read `<results_dir>/<name>.csv`; a missing file raises FileNotFoundError saying why it is missing."""
    path = _path(name, results_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"results {name!r} missing: {path} does not exist because {_why_missing(path)}"
        )
    df = pd.read_csv(path, dtype={"metric": str, "unit": str, "status": str, "reason": str})
    df["reason"] = df["reason"].fillna("")
    return df


def save_figure(fig: Any, name: str, figures_dir: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically as `<figures_dir>/<name>.png`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(Path(figures_dir) / f"{name}.png", buf.getvalue())


def _path(name: str, results_dir: str | Path) -> Path:
    name = name.removesuffix(".csv")
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"results name {name!r} must be a plain notebook stem such as '01_kv_cache'")
    return Path(results_dir) / f"{name}.csv"


def _check_status(status: Any, where: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")


def _why_missing(path: Path) -> str:
    name = path.stem
    run_json = path.parent.parent / "run.json"
    hint = f"(run `effllm report --notebooks {name}`)"
    try:
        record = json.loads(run_json.read_text())["notebooks"].get(name)
    except (OSError, ValueError, KeyError, AttributeError):
        return f"notebook {name} has not been run {hint}"
    if record is None:
        return f"notebook {name} was not run in this report {hint}"
    if record.get("status") == "failed":
        err = record.get("error") or {}
        return f"notebook {name} failed ({err.get('ename', '?')}: {err.get('evalue', '')})"
    return f"notebook {name} finished with status {record.get('status')!r} but wrote no results"


def try_load(name: str, results_dir: str | Path) -> tuple[pd.DataFrame | None, str]:
    """(results, "") when the notebook's results exist, else (None, why they are missing)."""
    try:
        return load(name, results_dir), ""
    except FileNotFoundError as e:
        return None, str(e)
