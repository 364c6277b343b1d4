"""Seaborn figures shared by the notebooks and the summary; each returns a matplotlib Figure."""

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from effllm.bench.rows import LEDGER_TERMS, WEIGHT_FORMATS

sns.set_theme(style="whitegrid", context="notebook")


def _panels_by_batch(data: pd.DataFrame, *, x: str, hue: str, xlabel: str, ylabel: str, log: bool) -> Figure:
    """Lines of `value` against x, one per hue, one panel per batch size."""
    g = sns.relplot(
        data=data,
        x=x,
        y="value",
        hue=hue,
        col="batch",
        kind="line",
        marker="o",
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": log},
    )
    if log:
        g.set(xscale="log", yscale="log")
    g.set_axis_labels(xlabel, ylabel)
    g.set_titles("batch {col_name}")
    return g.figure


def length_sweep(sweep: pd.DataFrame) -> Figure:
    """Runtime against generated tokens, cache on and off, one panel per batch size."""
    data = sweep[(sweep["metric"] == "runtime_s") & (sweep["status"] == "ok")]
    return _panels_by_batch(
        data, x="new_tokens", hue="cache", xlabel="generated tokens", ylabel="runtime (s)", log=False
    )


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def ledger_bars(terms: pd.DataFrame, *, title: str = "") -> Figure:
    """Predicted memory by ledger term (stacked) beside the measured peak, per configuration (MB).

    terms: one row per configuration, columns predicted_<term>_bytes, peak_bytes, peak_live_bytes (MB).
    """
    fig, ax = plt.subplots(figsize=(max(7.2, 1.2 * len(terms) + 3.5), 3.8))
    x = range(len(terms))
    bottom = pd.Series(0.0, index=terms.index)
    stored = [f"parameters_{fmt}" for fmt in WEIGHT_FORMATS if f"predicted_parameters_{fmt}_bytes" in terms]
    for term in LEDGER_TERMS:  # the parameters split by how they are stored (fp32, nf4...) where known
        for part in stored if term == "parameters" and stored else [term]:
            col = f"predicted_{part}_bytes"
            if col in terms and terms[col].fillna(0).any():
                height = terms[col].fillna(0)
                label = part.replace("parameters_", "weights ").replace("_", " ")
                ax.bar([i - 0.2 for i in x], height, 0.4, bottom=bottom, label=label)
                bottom += height
    if "peak_bytes" in terms:
        ax.bar([i + 0.2 for i in x], terms["peak_bytes"], 0.4, color="0.35", label="measured peak")
    if "peak_live_bytes" in terms:  # CPU: the tensors' own peak, inside the resident set's
        ax.bar(
            [i + 0.2 for i in x],
            terms["peak_live_bytes"],
            0.4,
            fill=False,
            hatch="//",
            edgecolor="0.1",
            label="live tensors at peak",
        )
    ax.set_xticks(list(x), terms.index, rotation=15, ha="right")
    ax.set(ylabel="MB", title=title or "predicted (stacked) vs measured")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.tight_layout()
    return fig


def memory_bars(table: pd.DataFrame, columns: list[str], *, title: str) -> Figure:
    """Grouped bars of some MB columns of a per-configuration table (those it has)."""
    present = [c for c in columns if c in table]
    long = (
        table[present]
        .rename_axis("config")
        .reset_index()
        .melt(id_vars="config", var_name="quantity", value_name="MB")
    )
    return bars(long, x="config", y="MB", hue="quantity", ylabel="MB", title=title)


def by_length(predicted: pd.DataFrame, *, title: str) -> Figure:
    """Predicted saved activations against length, one line per configuration (columns seq_len, MB)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.lineplot(data=predicted, x="seq_len", y="MB", hue="config", marker="o", ax=ax)
    ax.set(xlabel="sequence length (tokens)", ylabel="saved activations (MB)", title=title)
    fig.tight_layout()
    return fig


def gradient_errors(grads: pd.DataFrame, *, title: str) -> Figure:
    """Relative gradient error of each accumulated split, by normalisation (log scale)."""
    data = grads[grads["metric"] == "relative_error"].assign(split=lambda d: d["config"].str.split().str[0])
    fig = bars(data, x="split", y="value", hue="normalisation", ylabel="relative gradient error", title=title)
    fig.axes[0].set_yscale("log")
    return fig


def curve_grid(curves: pd.DataFrame) -> Figure:
    """Every loss curve of the run: one panel per notebook, one line per configuration."""
    g = sns.relplot(
        data=curves,
        x="step",
        y="value",
        hue="config",
        col="notebook",
        kind="line",
        marker="o",
        col_wrap=2,
        height=3.0,
        aspect=1.4,
        facet_kws={"sharey": False},
    )
    g.set_axis_labels("optimizer step", "training loss (nats)")
    g.set_titles("{col_name}")
    return g.figure


def trainable_share(rows: pd.DataFrame) -> Figure:
    """LoRA's trainable share of the parameters against the rank, one line per target set (log-log)."""
    data = rows[(rows["metric"] == "trainable_pct") & (rows["status"] == "ok")]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    sns.lineplot(data=data, x="r", y="value", hue="targets", marker="o", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="LoRA rank r", ylabel="trainable parameters (%)")
    ranks = sorted(data["r"].unique())
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    fig.tight_layout()
    return fig


def loss_scale(curves: pd.DataFrame, *, title: str = "") -> Figure:
    """The fp16 loss scale at each optimizer step (log2 axis); a drop marks a step the scaler skipped."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    sns.lineplot(data=curves, x="step", y="value", hue="config", marker="o", drawstyle="steps-post", ax=ax)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(xlabel="optimizer step", ylabel="loss scale", title=title)
    fig.tight_layout()
    return fig


def learning_curve(curves: pd.DataFrame, *, title: str = "", window: int = 5) -> Figure:
    """Training loss per optimizer step (faint points) with its centred rolling mean, and the held-out
    loss (markers). curves: columns metric ("loss" or "eval_loss"), step, value."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    train = curves[curves["metric"] == "loss"].sort_values("step")
    held = curves[curves["metric"] == "eval_loss"].sort_values("step")
    blue, orange = sns.color_palette()[:2]
    ax.scatter(train["step"], train["value"], s=12, alpha=0.3, color=blue, label="training, each step")
    smooth = train["value"].rolling(window, min_periods=1, center=True).mean()
    ax.plot(train["step"], smooth, color=blue, label=f"training, mean of {window} steps")
    ax.plot(held["step"], held["value"], marker="o", color=orange, label="held-out")
    ax.set(xlabel="optimizer step", ylabel="loss (nats)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    return fig


def roofline(table: pd.DataFrame, bandwidth: float) -> Figure:
    """Decode tokens/s against bytes read per token (log-log), one marker per path and batch, under the
    memory-bandwidth roof tokens/s = bandwidth / bytes per token."""
    data = table.reset_index().dropna(subset=["decode_tokens_per_s", "read_mb_per_token"])
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    sns.scatterplot(
        data=data, x="read_mb_per_token", y="decode_tokens_per_s", hue="path", style="batch", s=70, ax=ax
    )
    lo, hi = data["read_mb_per_token"].min() / 1.5, data["read_mb_per_token"].max() * 1.5
    xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    ax.plot(xs, [bandwidth / (x * 1e6) for x in xs], color="0.3", lw=1.2, ls="--")
    ax.annotate(
        f"roof: {bandwidth / 1e9:.0f} GB/s read",
        (xs[5], bandwidth / (xs[5] * 1e6)),
        fontsize=9,
        xytext=(6, 4),
        textcoords="offset points",
        color="0.3",
    )
    ax.set(xscale="log", yscale="log", xlabel="bytes read per generated token (MB)", ylabel="decode tokens/s")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def attention_times(attention: pd.DataFrame) -> Figure:
    """Prefill attention time against sequence length per kernel, one panel per batch size (log-log)."""
    data = attention[(attention["metric"] == "runtime_s") & (attention["status"] == "ok")]
    xlabel, ylabel = "sequence length (tokens)", "prefill attention (s)"
    return _panels_by_batch(data, x="length", hue="kernel", xlabel=xlabel, ylabel=ylabel, log=True)
