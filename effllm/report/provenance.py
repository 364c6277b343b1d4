"""Provenance of a report run: hardware, OS, package versions, git commit and date.

Deliberately never reads environment variables (they may hold tokens). torch is imported only in a
child process, to name the GPUs. Notebooks add their own model and data checksums as `<stem>/meta.json`.
"""

from __future__ import annotations

import hashlib
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
from effllm.report.paths import DATA_DIR, ROOT

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
        "data": _data(),
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


def describe(prov: dict[str, Any], meta: dict[str, dict] | None = None) -> dict[str, list[tuple[str, str]]]:
    """Readable (item, value) rows of a `collect()` result and the notebooks' meta.json files, grouped:
    hardware, software, model, data, run. Paths are shown relative to the checkout or `~`."""
    meta = meta or {}
    hw, git = prov.get("hardware", {}), prov.get("git", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in hw.get("gpus", [])) or "none"
    hardware = [
        ("CPU", f"{hw.get('cpu')}, {hw.get('logical_cores')} logical cores"),
        ("Memory", f"{hw.get('ram_gib')} GiB"),
        ("GPU", gpus),
    ]
    support = next((m["half_precision_support"] for m in meta.values() if "half_precision_support" in m), {})
    if support:
        hardware.append(("16-bit arithmetic", "; ".join(f"{k}: {v}" for k, v in support.items())))
    software = [("OS", prov.get("os")), ("Python", prov.get("python"))]
    software += [(name, version) for name, version in prov.get("packages", {}).items() if version]
    models: dict[str, list[str]] = {}
    for stem, m in meta.items():
        if "model" in m:
            models.setdefault(json.dumps(m["model"], sort_keys=True), []).append(stem)
    model = []
    for key, stems in models.items():
        m = json.loads(key)
        where = f" ({m['path']})" if m.get("path") else ""
        model.append((f"{m.get('source')} ({m.get('kind')})", f"used by {', '.join(stems)}{where}"))
        digests = m.get("sha256", {})
        digests = digests if isinstance(digests, dict) else {"the weights": digests}
        model += [(f"sha256 of {name}", digest) for name, digest in digests.items()]
        if m.get("weights"):
            model.append(("weights", m["weights"]))
    data = [
        (name, f"{d.get('examples')} examples, sha256 {d.get('sha256')}")
        for name, d in prov.get("data", {}).items()
    ]
    commit = (git.get("commit") or git.get("note", "unknown")) + (" (dirty)" if git.get("dirty") else "")
    run = [("Date (UTC)", prov.get("date_utc")), ("Git commit", commit)]
    return {"Hardware": hardware, "Software": software, "Model": model, "Data": data, "Run": run}


def _data() -> dict[str, dict[str, Any]]:
    """The data files the notebooks read: their number of examples and sha256."""
    out = {}
    for path in sorted(DATA_DIR.glob("*.json")):
        try:
            examples = len(json.loads(path.read_text()))
        except ValueError:
            examples = None
        out[f"data/{path.name}"] = {
            "examples": examples,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
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
        return {
            "commit": None,
            "dirty": None,
            "note": "the checkout is not a git repository (or git is missing)",
        }
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}
    except subprocess.SubprocessError:
        return {"commit": None, "dirty": dirty, "note": "the repository has no commits yet"}
