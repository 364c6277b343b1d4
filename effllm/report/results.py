"""Tidy results on disk: one CSV per notebook section, `<results_dir>/<stem>/<section>.csv`, atomically.

A notebook saves each section's rows as soon as they are measured (`effllm.bench.rows` defines a row), so
a later failure keeps what was measured; the summary notebook only reads them. A notebook's provenance
(model and data checksums) is `<results_dir>/<stem>/meta.json`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from effllm.bench.rows import COLUMNS, STATUSES
from effllm.files import atomic_write_bytes, atomic_write_text

REQUIRED = ("metric", "value", "unit")
NAME = re.compile(r"^[\w-]+$")


def section_path(results_dir: str | Path, stem: str, section: str) -> Path:
    """The CSV of one section of a notebook's results."""
    for kind, name in (("notebook", stem), ("section", section)):
        if not NAME.match(name):
            raise ValueError(f"{kind} name {name!r} must be letters, digits, '_' or '-' (e.g. '01_kv_cache')")
    return Path(results_dir) / stem / f"{section}.csv"


def save(rows: list[dict] | pd.DataFrame, results_dir: str | Path, stem: str, section: str) -> pd.DataFrame:
    """Validate tidy rows and write them atomically as one section of a notebook's results; return them."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    where = f"results {stem}/{section}"
    if df.empty:
        raise ValueError(f"{where}: no rows to save")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(missing)}; build rows with effllm.bench.rows.row"
        )
    df["status"] = df["status"].astype(object).fillna("ok") if "status" in df else "ok"
    df["reason"] = df["reason"].astype(object).fillna("") if "reason" in df else ""
    bad = sorted(set(df["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"{where}: status {bad} is not one of {', '.join(STATUSES)}")
    try:
        df["value"] = pd.to_numeric(df["value"]).astype(float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: column 'value' must be numeric (NaN when failed): {e}") from e
    df = df[[c for c in df.columns if c not in COLUMNS] + list(COLUMNS)]
    atomic_write_text(section_path(results_dir, stem, section), df.to_csv(index=False))
    return df


def load(results_dir: str | Path, stem: str, section: str) -> pd.DataFrame:
    """Read one section; a missing file raises FileNotFoundError saying why it is missing."""
    path = section_path(results_dir, stem, section)
    if not path.exists():
        raise FileNotFoundError(
            f"results {stem}/{section} missing: {_why_missing(Path(results_dir), stem, section)}"
        )
    df = pd.read_csv(path, dtype={"metric": str, "unit": str, "status": str, "reason": str})
    df["reason"] = df["reason"].fillna("")
    return df


def try_load(results_dir: str | Path, stem: str, section: str) -> tuple[pd.DataFrame | None, str]:
    """(results, "") when the section exists, else (None, why it is missing)."""
    try:
        return load(results_dir, stem, section), ""
    except FileNotFoundError as e:
        return None, str(e)


def save_meta(results_dir: str | Path, stem: str, meta: dict[str, Any]) -> Path:
    """Write a notebook's provenance (model and data checksums, hardware support...) as its meta.json."""
    return atomic_write_text(Path(results_dir) / stem / "meta.json", json.dumps(meta, indent=1, default=str))


def png(fig: Any, dpi: int = 120) -> bytes:
    """A matplotlib figure as PNG bytes, cropped to its content."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Any, name: str, figures_dir: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically as `<figures_dir>/<name>.png`."""
    return atomic_write_bytes(Path(figures_dir) / f"{name}.png", png(fig, dpi))


def _why_missing(results_dir: Path, stem: str, section: str) -> str:
    hint = f"(run `effllm report --notebooks {stem}`)"
    try:
        record = json.loads((results_dir.parent / "run.json").read_text())["notebooks"].get(stem)
    except (OSError, ValueError, KeyError, AttributeError):
        return f"notebook {stem} has not been run {hint}"
    if record is None:
        return f"notebook {stem} was not run in this report {hint}"
    if record.get("status") == "failed":
        err = record.get("error") or {}
        return f"notebook {stem} failed ({err.get('ename', '?')}: {err.get('evalue', '')})"
    return f"notebook {stem} finished with status {record.get('status')!r} but saved no section {section!r}"


def sections(results_dir: str | Path, stem: str) -> list[str]:
    """The sections a notebook saved in this run, by name."""
    return sorted(p.stem for p in (Path(results_dir) / stem).glob("*.csv"))
