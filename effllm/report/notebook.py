"""The one setup call of a report notebook: device, output folders, display defaults and savers.

`nb = setup("02_lora", results_dir=..., figures_dir=..., device=..., model=...)` resolves the device,
records the model's provenance in the notebook's meta.json, and gives `nb.save(section, rows)` (tidy rows
written atomically as soon as they are measured), `nb.figure(name, fig)` and `nb.progress(desc)`.
"""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from effllm.device import resolve_device
from effllm.loading import describe_source
from effllm.report import results


class Notebook:
    """What a report notebook writes: result sections, figures and provenance, under its own stem."""

    def __init__(self, stem: str, results_dir: str | Path, figures_dir: str | Path, device: str):
        self.stem, self.results_dir, self.figures_dir, self.device = (
            stem,
            Path(results_dir),
            Path(figures_dir),
            device,
        )
        self._meta: dict[str, Any] = {}

    def save(self, section: str, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
        """Write one section of tidy rows now (a later failure keeps them) and return them as a DataFrame."""
        return results.save(rows, self.results_dir, self.stem, section)

    def figure(self, name: str, fig) -> None:
        """Save a figure as figures_dir/<name>.png (the notebook shows it inline as well)."""
        results.save_figure(fig, name, self.figures_dir)

    def meta(self, **info: Any) -> None:
        """Add provenance to the notebook's meta.json (the report's provenance table shows it)."""
        self._meta.update(info)
        results.save_meta(self.results_dir, self.stem, self._meta)

    def progress(self, desc: str) -> Callable[[Iterable], Iterable]:
        """A progress bar over a list of configurations, for the `progress=` argument of a sweep."""
        return lambda items: tqdm(items, desc=desc)


def setup(
    stem: str, results_dir: str, figures_dir: str, *, device: str = "cpu", model: str | None = None
) -> Notebook:
    """Resolve the device, set pandas' display, and record the model's provenance."""
    pd.options.display.float_format = "{:,.3f}".format
    nb = Notebook(stem, results_dir, figures_dir, str(resolve_device(device)))
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    if model is not None:
        nb.meta(model=describe_source(model))
    return nb
