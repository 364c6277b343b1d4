"""Where the repository keeps what the report needs: notebooks, data, reports."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
DATA_DIR = ROOT / "data"
