"""The one setup call of a report notebook: device, output folders, display defaults and savers.

`nb = setup("02_lora", run_dir, device=..., model=...)` resolves the device and the run directory (a
relative `run_dir` is taken from the repository root, so papermill, JupyterLab and the runner write to the
same place from any working directory), records the model's provenance in the notebook's meta.json, makes
every DataFrame the notebook shows a readable table (`effllm.report.display`), and gives
`nb.save(section, rows)` (tidy rows written atomically as soon as they are measured),
`nb.figure(name, fig, caption)` and `nb.progress(desc)`.
"""

import base64
from collections.abc import Callable, Iterable
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from effllm.device import resolve_device
from effllm.files import atomic_write_bytes, repo_path
from effllm.loading import describe_source
from effllm.report import display, results
from effllm.report.paths import shown


class Notebook:
    """What a report notebook writes: result sections, figures and provenance, under its own stem."""

    def __init__(self, stem: str, run_dir: str | Path, device: str):
        self.stem, self.device = stem, device
        self.run_dir = repo_path(run_dir)
        self.results_dir = self.run_dir / "results"
        self.figures_dir = self.run_dir / "figures" / stem
        self._meta: dict[str, Any] = {}

    def save(self, section: str, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
        """Write one section of tidy rows now (a later failure keeps them) and return them as a DataFrame."""
        return results.save(rows, self.results_dir, self.stem, section)

    def figure(self, name: str, fig, caption: str, alt: str | None = None) -> None:
        """Save a figure as figures/<stem>/<name>.png and show it with its caption and alt text."""
        import matplotlib.pyplot as plt
        from IPython.display import HTML
        from IPython.display import display as show

        image = results.png(fig)
        plt.close(fig)  # shown once, below, not again by the inline backend
        atomic_write_bytes(self.figures_dir / f"{name}.png", image)
        data = base64.b64encode(image).decode("ascii")
        show(
            HTML(
                f'<figure class="effllm-figure" id="fig-{self.stem}-{name}">'
                f'<img src="data:image/png;base64,{data}" alt="{escape(alt or caption)}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>"
            )
        )

    def meta(self, **info: Any) -> None:
        """Add provenance to the notebook's meta.json (the report's provenance table shows it)."""
        self._meta.update(info)
        results.save_meta(self.results_dir, self.stem, self._meta)

    def progress(self, desc: str) -> Callable[[Iterable], Iterable]:
        """A progress bar over a list of configurations, for the `progress=` argument of a sweep."""
        return lambda items: tqdm(items, desc=desc)


def setup(stem: str, run_dir: str, *, device: str = "cpu", model: str | None = None) -> Notebook:
    """Resolve the device and the run directory, install the table display, record the model's source."""
    display.install()
    nb = Notebook(stem, run_dir, str(resolve_device(device)))
    nb.figures_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        source = describe_source(model)
        nb.meta(model={k: shown(v) if k == "path" else v for k, v in source.items()})
    return nb
