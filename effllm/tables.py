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
    df = df.astype({"batch": int})  # read back from CSV, batch may be float
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
    on = out[out.index.get_level_values("cache") == "on"]["runtime_s"].droplevel("cache")
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
    df = df.astype({"batch": int})  # read back from CSV, batch may be float
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


STACK = ["Baseline (FP32)", "+ Mixed precision", "+ Checkpointing", "+ LoRA"]  # 02_lora's "stack" section


def finetune_table(df: pd.DataFrame) -> pd.DataFrame:
    """The reference fine-tuning table (techniques stacked) from 02_lora's rows with section 'stack'."""
    rows = df[df["section"] == "stack"]
    ok = rows[rows["status"] == "ok"].pivot_table(
        index="config", columns="metric", values="value", sort=False
    )
    out = pd.DataFrame(index=[c for c in STACK if c in set(rows["config"])])
    out["peak_memory_mb"] = ok.get("peak_bytes", pd.Series(dtype=float)) / 1e6
    out["predicted_mb"] = ok.get("predicted_total_bytes", pd.Series(dtype=float)) / 1e6
    if "peak_live_bytes" in ok:  # CPU: the tensors' own peak, without the allocator's slack
        out["live_tensors_mb"] = ok["peak_live_bytes"] / 1e6
    out["runtime_per_step_s"] = ok.get("step_s")
    out["trainable_pct"] = ok.get("trainable_pct")
    for _, r in rows[rows["status"] != "ok"].iterrows():
        out.loc[r["config"], "status"] = f"{r['status']}: {r['reason']}"
    out.index.name = "technique"
    return out


def step_changes(table: pd.DataFrame, column: str) -> pd.Series:
    """Each row's value relative to the row above it (how much one more technique changes the column)."""
    return table[column] / table[column].shift(1)


# Why a technique can move step time or peak memory the other way here than in the reference.
WHY = {
    "+ Mixed precision": {
        "step time": "half-precision matmuls only run faster on units built for them (GPU tensor cores; on a "
        "CPU, AVX-512 BF16 or AMX) and only pay when they dominate the step; otherwise autocast only adds "
        "casts",
        "peak memory": "autocast keeps fp32 weights, gradients and optimizer state and adds half-precision "
        "copies of the weights, saving only on activations, a small share for a small model at short "
        "sequences (the reference's 7.8 GB is below the 9.9 GB of fp32 weights and gradients of a 1B "
        "model, so it presumably held the weights in half precision too)",
    },
    "+ Checkpointing": {
        "step time": "re-computing each block's forward in backward costs about one more forward pass, so "
        "a faster step can only be run-to-run noise",
        "peak memory": "it saves activations only, which are small next to weights and gradients at short "
        "sequences, while the re-computation adds transient buffers of its own",
    },
    "+ LoRA": {
        "step time": "the step still runs the whole forward and nearly all of the backward (gradients flow "
        "through the frozen layers to the adapters), so its saving is small and can drown in noise",
        "peak memory": "freezing the base removes its gradients and optimizer state, which should always "
        "lower the peak; a higher one points at the measurement",
    },
}
CACHE_WHY = {
    True: (
        "a CPU's few cores are saturated by the prompt recomputed at every step, so the cache saves "
        "relatively more; a GPU absorbs much of that recomputation in otherwise idle parallel units"
    ),
    False: (
        "the saving grows with batch and length, as the recomputed work does; the model and the "
        "hardware set its size"
    ),
}


def disagreements(inference: pd.DataFrame | None, finetune: pd.DataFrame | None, device: str) -> list[str]:
    """Where this run's effects differ from the reference's, each with its reason (markdown bullets)."""
    out = []
    if inference is not None and {1, 16} <= set(inference.index.get_level_values("batch")):
        ref, ours = REFERENCE_INFERENCE.set_index(["batch", "cache"])["runtime_s"], inference["runtime_s"]
        for b in (1, 16):
            r, o = ref[(b, "off")] / ref[(b, "on")], ours[(b, "off")] / ours[(b, "on")]
            reason = CACHE_WHY[device == "cpu" and o > r]
            out.append(f"- KV cache at batch {b}: no-cache / cache runtime **{o:.1f}x** here, "
                       f"{r:.1f}x in the reference: {reason}.")  # fmt: skip
    if finetune is not None:
        out += technique_changes(finetune, only_differing=True)
    return out


def technique_changes(finetune: pd.DataFrame, only_differing: bool = False) -> list[str]:
    """Each technique of the stacked table against the row above it, here and in the reference.

    Where step time or peak memory moves the other way than in the reference, the reason is given.
    """
    here, ref = finetune.reindex(STACK), REFERENCE_FINETUNE.set_index(pd.Index(STACK))
    columns = {"step time": "runtime_per_step_s", "peak memory": "peak_memory_mb"}
    lines = []
    for tech in STACK[1:]:
        ours = {k: step_changes(here, c)[tech] for k, c in columns.items()}
        theirs = {k: step_changes(ref, c)[tech] for k, c in columns.items()}
        if any(pd.isna(v) for v in ours.values()):
            continue
        differ = [k for k in columns if (ours[k] < 1) != (theirs[k] < 1)]
        if only_differing and not differ:
            continue
        why = "; ".join(f"{k} goes the other way: {WHY[tech][k]}" for k in differ)
        lines.append(
            f"- **{tech}**: step time x{ours['step time']:.2f}, peak memory x{ours['peak memory']:.2f} "
            f"(reference: x{theirs['step time']:.2f}, x{theirs['peak memory']:.2f})"
            + (f"; {why}." if differ else ", as in the reference.")
        )
    return lines
