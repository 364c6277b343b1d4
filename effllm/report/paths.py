"""Where the repository keeps what the report needs, and paths as a report shows them.

A report never shows the checkout's absolute path (under /home it names the user): `shown` gives a path
relative to the checkout, else to the home directory (`~`), and `scrub` does the same inside any text
(tracebacks, warnings).
"""

import re
from pathlib import Path

from effllm.files import REPO

ROOT = REPO
NOTEBOOKS_DIR = ROOT / "notebooks"
DATA_DIR = ROOT / "data"
HOME = Path.home()


def shown(path: str | Path) -> str:
    """A path relative to the checkout if inside it, else relative to `~`, else as it is."""
    path = Path(path)
    for base, prefix in ((ROOT, ""), (HOME, "~/")):
        if path.is_absolute() and path.is_relative_to(base) and base != Path("/"):
            rel = path.relative_to(base).as_posix()
            return prefix + rel if rel != "." else (prefix.rstrip("/") or ".")
    return str(path)


def scrub(text: str) -> str:
    """Text with the checkout's and the home directory's absolute paths made relative (as `shown`)."""
    for base, prefix in ((ROOT, ""), (HOME, "~/")):
        if base == Path("/"):
            continue
        bare = prefix.rstrip("/") or "."
        text = re.sub(
            re.escape(str(base)) + r"(/|(?![\w-]|\.\w))", lambda m, p=prefix, b=bare: p if m[1] else b, text
        )
    return text


def for_run(path: str | Path) -> str:
    """A path as a notebook parameter: relative to the checkout when inside it (notebooks resolve it)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
