"""Headline tables built from the tidy results, and the reference figures they are set beside.

The reference figures are the ones published with the original exercise, measured with Llama 3.2 1B
on an NVIDIA P100 16 GB GPU; they are labelled as such wherever they are shown.
"""

import pandas as pd

REFERENCE_HARDWARE = "NVIDIA P100 16 GB, Llama 3.2 1B (reference)"
REFERENCE_INFERENCE = pd.DataFrame(
    [(1, "on", 3.07, 0.37), (1, "off", 3.23, 0.41), (8, "on", 4.50, 0.52), (8, "off", 5.76, 1.80),
     (16, "on", 6.13, 0.63), (16, "off", 8.64, 4.25)],
    columns=["batch", "cache", "peak_memory_gb", "runtime_s"],
)  # fmt: skip
REFERENCE_FINETUNE = pd.DataFrame(
    [("Baseline (FP32)", 14800, 1.12), ("+ Mixed precision", 7800, 0.61), ("+ Checkpointing", 6200, 0.73),
     ("+ LoRA (PEFT)", 6100, 0.68)],
    columns=["technique", "peak_memory_mb", "runtime_per_step_s"],
)  # fmt: skip


def metric(df: pd.DataFrame, name: str, index: list[str], **where) -> pd.Series:
    """One metric's values indexed by `index`, from tidy rows filtered by column=value pairs."""
    sel = df[(df["metric"] == name) & (df["status"] == "ok")]
    for col, val in where.items():
        sel = sel[sel[col] == val]
    return sel.set_index(index)["value"]


def peak_memory_metric(df: pd.DataFrame) -> str:
    """CUDA runs report allocated bytes; CPU runs the peak resident set of a fresh process."""
    return "peak_allocated_bytes" if (df["metric"] == "peak_allocated_bytes").any() else "peak_rss_bytes"


def inference_table(df: pd.DataFrame) -> pd.DataFrame:
    """The reference inference table (batch x cache) from 01_kv_cache results, ours beside transformers."""
    idx = ["batch", "cache"]
    ours = dict(impl="ours")
    out = pd.DataFrame(
        {
            "peak_memory_gb": metric(df, peak_memory_metric(df), idx, **ours) / 1e9,
            "runtime_s": metric(df, "runtime_s", idx, **ours),
            "tokens_per_s": metric(df, "tokens_per_s", idx, **ours),
            "prefill_s": metric(df, "prefill_s", idx, **ours),
            "decode_s": metric(df, "decode_s", idx, **ours),
            "kv_cache_mb": metric(df, "kv_cache_bytes", idx, **ours) / 1e6,
        }
    )
    hf = metric(df, "tokens_per_s", idx, impl="transformers")
    if len(hf):
        out["transformers_tokens_per_s"] = hf
        out["speedup_vs_transformers"] = out["tokens_per_s"] / hf
    on = out.xs("on", level="cache")["runtime_s"]
    out["delta_runtime_s"] = [r - on.get(b, float("nan")) for (b, _), r in out["runtime_s"].items()]
    failed = df[(df["status"] != "ok") & (df.get("impl", "ours") == "ours")]
    for _, row in failed.iterrows():
        out.loc[(row["batch"], row["cache"]), "status"] = f"{row['status']}: {row['reason']}"
    return out.sort_index(level=["batch", "cache"], ascending=[True, False])


def beside_reference(ours: pd.DataFrame, reference: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """This run's table and the reference side by side, under two column headings."""
    return pd.concat({"this run": ours, REFERENCE_HARDWARE: reference.set_index(on)}, axis=1, sort=False)


def memory_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measured peak memory per configuration, split by the analytic ledger (MB)."""
    m = df[(df["impl"] == "ours") & (df["status"] == "ok")].pivot_table(
        index=["batch", "cache"], columns="metric", values="value"
    )
    peak = m[peak_memory_metric(df)]
    out = pd.DataFrame(
        {"measured peak": peak, "weights": m["weights_bytes"], "KV cache (formula)": m["kv_cache_bytes"]}
    )
    base = (
        m["baseline_rss_bytes"] if "baseline_rss_bytes" in m and "peak_rss_bytes" in m else m["weights_bytes"]
    )
    if "baseline_rss_bytes" in m and "peak_rss_bytes" in m:
        out.insert(1, "Python, torch, libraries", base - m["weights_bytes"])
    out["activations and buffers"] = peak - base - m["kv_cache_bytes"]
    return (out / 1e6).sort_index(level=["batch", "cache"], ascending=[True, False])


def cache_pays_from(sweep: pd.DataFrame) -> dict[int, int | None]:
    """Per batch size, the shortest generated length at which decoding with the cache is faster."""
    t = metric(sweep, "runtime_s", ["batch", "new_tokens", "cache"]).unstack("cache")
    faster = t[t["on"] < t["off"]].reset_index()
    return {int(b): (int(faster[faster.batch == b].new_tokens.min()) if (faster.batch == b).any() else None)
            for b in sorted(t.index.get_level_values("batch").unique())}  # fmt: skip
