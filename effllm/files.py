"""Atomic file writes: every file effllm writes goes through here, so a crash never leaves half a file."""

import contextlib
import os
import tempfile
from pathlib import Path


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


REPO = Path(__file__).resolve().parents[1]  # the checkout effllm runs from (installed editable)


def repo_path(path: str | Path) -> Path:
    """An absolute path as it is; a relative one from the repository root, never the current directory.

    So a notebook's `data_dir="data"` means the same folder whether papermill, JupyterLab or the report
    runner starts it, from whichever directory.
    """
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path
