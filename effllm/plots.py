"""Seaborn figures shared by the notebooks and the summary; each returns a matplotlib Figure."""

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

sns.set_theme(style="whitegrid", context="notebook")


def length_sweep(sweep: pd.DataFrame) -> Figure:
    """Runtime against generated tokens, cache on and off, one panel per batch size."""
    data = sweep[(sweep["metric"] == "runtime_s") & (sweep["status"] == "ok")]
    g = sns.relplot(data=data, x="new_tokens", y="value", hue="cache", col="batch", kind="line", marker="o",
                    height=3.2, aspect=1.1, facet_kws={"sharey": False})  # fmt: skip
    g.set_axis_labels("generated tokens", "runtime (s)")
    g.set_titles("batch {col_name}")
    return g.figure


def bars(
    table: pd.DataFrame, *, x: str, y: str, hue: str | None = None, ylabel: str = "", title: str = ""
) -> Figure:
    """A bar chart of one column of a tidy table."""
    g = sns.catplot(data=table, x=x, y=y, hue=hue, kind="bar", height=3.2, aspect=1.6)
    g.set_axis_labels(x, ylabel or y)
    g.figure.suptitle(title, y=1.03)
    return g.figure


def loss_curves(
    curves: pd.DataFrame, *, hue: str = "config", title: str = "", ylabel: str = "loss (nats)"
) -> Figure:
    """Loss against optimizer step, one line per configuration (columns: step, value, hue)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.lineplot(data=curves, x="step", y="value", hue=hue, marker="o", ax=ax)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig
