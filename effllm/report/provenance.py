"""Provenance of a report run: hardware, OS, package versions, git commit and date.

Deliberately never reads environment variables (they may hold tokens). torch is imported only in a
child process, to name the GPUs. Notebooks add their own model and data checksums as `<stem>/meta.json`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from effllm.bench.cpu import cpu_name
from effllm.report.paths import ROOT

_GPU_QUERY = """import json, torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
props = [torch.cuda.get_device_properties(i) for i in range(n)]
print(json.dumps([{"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)} for p in props]))"""
PACKAGES = ("torch", "transformers", "peft", "papermill", "nbconvert", "pandas", "numpy", "effllm")


def collect() -> dict[str, Any]:
    """Hardware, OS, Python and package versions, git commit and the UTC date of this run."""
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "hardware": {
            "cpu": cpu_name(),
            "logical_cores": os.cpu_count(),
            "ram_gib": _ram_gib(),
            "gpus": _gpus(),
        },
        "git": _git(),
    }


def notebook_meta(results_dir: str | Path) -> dict[str, dict]:
    """The `<stem>/meta.json` files that notebooks wrote into `results_dir`, keyed by stem."""
    meta = {}
    for path in sorted(Path(results_dir).glob("*/meta.json")):
        try:
            meta[path.parent.name] = json.loads(path.read_text())
        except ValueError as e:
            meta[path.parent.name] = {"unreadable": f"{path.parent.name}/{path.name}: {e}"}
    return meta


def describe(prov: dict[str, Any], meta: dict[str, dict] | None = None) -> list[tuple[str, str]]:
    """Readable (item, value) rows of a `collect()` result and of the notebooks' meta.json files."""
    hw, git = prov.get("hardware", {}), prov.get("git", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in hw.get("gpus", [])) or "none"
    rows = [
        ("Date (UTC)", prov.get("date_utc")),
        (
            "Git commit",
            (git.get("commit") or git.get("note", "unknown")) + (" (dirty)" if git.get("dirty") else ""),
        ),
        ("OS", prov.get("os")),
        ("CPU", f"{hw.get('cpu')}, {hw.get('logical_cores')} logical cores, {hw.get('ram_gib')} GiB RAM"),
        ("GPU", gpus),
        ("Python", prov.get("python")),
        ("Packages", ", ".join(f"{k} {v}" for k, v in prov.get("packages", {}).items() if v)),
    ]
    return rows + [
        (f"{stem}: {key}", value) for stem, m in (meta or {}).items() for key, value in _flatten(m)
    ]


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in d.items():
        out += _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ram_gib() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.virtual_memory().total / 2**30, 1)


def _gpus() -> list[dict[str, Any]]:
    """GPUs as torch sees them, asked in a child process so that this one never holds a CUDA context."""
    if _version("torch") is None:
        return []
    try:
        out = subprocess.run([sys.executable, "-c", _GPU_QUERY], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return [{"name": "unknown: torch could not be asked about GPUs", "memory_gib": None}]


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": f"{ROOT} is not a git checkout (or git is missing)"}
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}
    except subprocess.SubprocessError:
        return {"commit": None, "dirty": dirty, "note": "the repository has no commits yet"}
