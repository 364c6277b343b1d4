"""How a table reads in the report: headers in words with units, numbers formatted per column.

`notebook.setup` installs `html` as IPython's HTML formatter of DataFrames, so every table a notebook shows
(the last expression of a cell or `display(df)`) goes through it; the DataFrames themselves keep their
snake_case names and full precision for code. Per column: whole numbers with thousands separators, other
numbers to three significant digits (scientific below 0.001), yes/no for booleans and "—" where a value is
not applicable (NaN). An empty table is a one-line note, never a bare header.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

NOT_APPLICABLE = "—"

# Headers (column and index names, and the values of column levels) in words, with units.
LABELS = {
    "peak_memory_gb": "Peak memory (GB)",
    "peak_memory_mb": "Peak memory (MB)",
    "runtime_s": "Runtime (s)",
    "tokens_per_s": "Tokens/s",
    "prefill_s": "Prefill (s)",
    "decode_s": "Decode (s)",
    "kv_cache_mb": "KV cache (MB)",
    "transformers_tokens_per_s": "transformers tokens/s",
    "speedup_vs_transformers": "ours / transformers (tokens/s)",
    "delta_runtime_s": "Extra runtime without the cache (s)",
    "predicted_mb": "Predicted (MB)",
    "predicted_memory_mb": "Predicted memory (MB)",
    "live_tensors_mb": "Live tensors (MB)",
    "weight_copies_mb": "16-bit weight copies (MB)",
    "runtime_per_step_s": "Time per step (s)",
    "step_s": "Time per step (s)",
    "micro_step_s": "Time per micro-step (s)",
    "backward_s": "Forward + backward (s)",
    "trainable_pct": "Trainable (%)",
    "trainable_params": "Trainable parameters",
    "final_loss": "Final loss",
    "skipped_steps": "Skipped steps",
    "speedup_vs_fp32": "Speed / fp32",
    "peak_allocated_mb": "Peak allocated (MB)",
    "baseline_rss_mb": "Resident before training (MB)",
    "peak_rss_mb": "Peak resident (MB)",
    "added_rss_mb": "Added by training (MB)",
    "tokens_identical": "Tokens identical",
    "first_divergence_step": "First differing step",
    "max_logit_diff": "Largest logit difference",
    "relative_error": "Relative error",
    "max_abs_error": "Largest absolute error",
    "max_abs_grad": "Largest gradient",
    "status": "Status",
    "value": "Value",
    "batch": "Batch",
    "cache": "KV cache",
    "technique": "Technique",
    "config": "Configuration",
    "dtype": "dtype",
    "r": "Rank r",
    "targets": "Targets",
    "seq_len": "Sequence length (tokens)",
    "max_len": "max_len (tokens)",
    "lora": "LoRA",
    "normalisation": "Normalisation",
    "results": "Results",
    "this run": "This run",
    "decode_tokens_per_s": "Decode tokens/s",
    "read_mb_per_token": "Read per token (MB)",
    "roof_tokens_per_s": "Bandwidth roof (tokens/s)",
    "share_of_roof_pct": "Share of the roof (%)",
    "compile_s": "Compile (s)",
    "perplexity": "Held-out perplexity",
    "perplexity_change_pct": "Perplexity vs fp32 (%)",
    "top1_agreement_pct": "Top-1 agreement with fp32 (%)",
    "path": "Path",
    "op": "Op",
    "ms_per_token": "Self time per token (ms)",
    "share_pct": "Share of the step (%)",
    "kernel": "Kernel",
    "length": "Length (tokens)",
}
BOOLEAN = {"tokens_identical", "lora"}  # 0/1 columns that mean no/yes
UNITS = [  # a name's suffix -> the unit its header shows (for names not in LABELS)
    ("_tokens_per_s", " (tokens/s)"),
    ("_gib", " (GiB)"),
    ("_gb", " (GB)"),
    ("_mb", " (MB)"),
    ("_bytes", " (bytes)"),
    ("_pct", " (%)"),
    ("_s", " (s)"),
]


def label(name: Any) -> Any:
    """A column or index name as a header: LABELS, else words with the unit its suffix names."""
    if not isinstance(name, str):
        return name
    if name in LABELS:
        return LABELS[name]
    if not re.fullmatch(r"[a-z0-9_]+", name):
        return name  # already words
    for suffix, unit in UNITS:
        if name.endswith(suffix):
            name = name.removesuffix(suffix) + unit
            break
    words = name.replace("_", " ")
    return words[:1].upper() + words[1:]


def number(v: Any) -> str:
    """One value: three significant digits, thousands separators, scientific below 0.001, "—" for NaN."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, (int, float)) or isinstance(v, complex):
        return NOT_APPLICABLE if v is None or v is pd.NA else str(v)
    if math.isnan(v):
        return NOT_APPLICABLE
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    a = abs(v)
    if a == 0:
        return "0"
    if float(v).is_integer() and a < 1e15:
        return f"{v:,.0f}"
    if a < 1e-3:
        return f"{v:.2e}"
    return f"{v:,.{max(0, 2 - math.floor(math.log10(a)))}f}"


def _formatter(name: Any, column: pd.Series):
    key = name[-1] if isinstance(name, tuple) else name
    if column.dtype == bool or key in BOOLEAN:
        return lambda v: NOT_APPLICABLE if pd.isna(v) else ("yes" if bool(v) else "no")
    return number


def style(df: pd.DataFrame) -> Any:
    """The table as a pandas Styler: headers in words, every column formatted for reading."""
    shown = df.copy(deep=False)  # the caller's frame keeps its names
    shown.index = shown.index.set_names([label(n) for n in df.index.names])
    shown.columns = shown.columns.set_names([label(n) for n in df.columns.names])
    formats = {c: _formatter(c, df[c]) for c in df.columns}
    styler = shown.style.format(formats, na_rep=NOT_APPLICABLE)
    styler = styler.format_index(number, axis=0).format_index(label, axis=1)
    return styler.set_table_attributes('class="effllm-table"')


def html(df: pd.DataFrame) -> str:
    """A table's HTML for the report; an empty one is a short note instead of a bare header."""
    if df.empty:
        return '<p class="effllm-empty"><em>No rows to show.</em></p>'
    return style(df).to_html()


def install() -> None:
    """Render every DataFrame a notebook shows with `html` (no-op outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, html)
