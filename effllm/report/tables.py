"""Headline tables built from the tidy results: one function per table a notebook or the summary shows.

Each takes the rows of one results section (`effllm.report.results`) and returns a DataFrame; none
measures anything.
"""

import pandas as pd

import effllm
from effllm.report import reference


def metric(df: pd.DataFrame, name: str, index: list[str], **where) -> pd.Series:
    """One metric's values indexed by `index`, from tidy rows filtered by column=value pairs."""
    sel = df[(df["metric"] == name) & (df["status"] == "ok")]
    for col, val in where.items():
        sel = sel[sel[col] == val]
    return sel.set_index(index)["value"]


def wide(df: pd.DataFrame, index: str | list[str] = "config") -> pd.DataFrame:
    """The ok rows as one column per metric, in run order."""
    return df[df["status"] == "ok"].pivot_table(index=index, columns="metric", values="value", sort=False)


def failures(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The failed rows: the given columns, status and reason (empty when everything ran)."""
    return df[df["status"] != "ok"][[*columns, "status", "reason"]].drop_duplicates()


def learn_curves(learn: pd.DataFrame) -> pd.DataFrame:
    """The fine-tune that learns: its training and held-out losses (columns metric, step, value)."""
    sel = learn[learn["metric"].isin(["loss", "eval_loss"]) & (learn["status"] == "ok")]
    return sel.astype({"step": int})[["metric", "step", "value"]]


def peak_memory_metric(df: pd.DataFrame) -> str:
    """CUDA runs report allocated bytes; CPU runs the peak resident set of a fresh process."""
    return "peak_allocated_bytes" if (df["metric"] == "peak_allocated_bytes").any() else "peak_rss_bytes"


def kv_ledger(model, *, batch_size: int, length: int) -> pd.DataFrame:
    """The analytic decoding ledger of a model: weights and KV cache bytes."""
    dtype = next(model.parameters()).dtype
    per_token = effllm.kv_cache_bytes(model.args, 1, 1, dtype)
    return pd.Series(
        {
            "weights (MB)": effllm.param_bytes(model) / 1e6,
            "KV cache per token per sequence (kB)": per_token / 1e3,
            f"KV cache at batch {batch_size}, {length} tokens (MB)": per_token * batch_size * length / 1e6,
        }
    ).to_frame("value")


def inference_table(df: pd.DataFrame) -> pd.DataFrame:
    """The reference inference table (batch x cache) from 01_kv_cache's rows, ours beside transformers."""
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
    out["delta_runtime_s"] = [  # not applicable (NaN) to the cached rows themselves
        r - on.get(b, float("nan")) if c == "off" else float("nan") for (b, c), r in out["runtime_s"].items()
    ]
    for _, r in df[(df["status"] != "ok") & (df["impl"] == "ours")].iterrows():
        out.loc[(r["batch"], r["cache"]), "status"] = f"{r['status']}: {r['reason']}"
    return out.sort_index(level=["batch", "cache"], ascending=[True, False])


def inference_vs_reference(inference: pd.DataFrame) -> pd.DataFrame:
    """Peak memory, runtime and the runtime the cache saves, beside the reference's."""
    ours = inference[["peak_memory_gb", "runtime_s", "delta_runtime_s"]]
    return reference.beside(ours, reference.INFERENCE, ["batch", "cache"])


def memory_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measured peak memory per decoding configuration, split by the analytic ledger (MB)."""
    df = df.astype({"batch": int})
    m = wide(df[df["impl"] == "ours"], ["batch", "cache"])
    peak = m[peak_memory_metric(df)]
    out = pd.DataFrame(
        {"measured peak": peak, "weights": m["weights_bytes"], "KV cache (formula)": m["kv_cache_bytes"]}
    )
    base = m["weights_bytes"]
    if "baseline_rss_bytes" in m and "peak_rss_bytes" in m:  # CPU: the whole process
        base = m["baseline_rss_bytes"]
        out.insert(1, "Python, torch, libraries", base - m["weights_bytes"])
    out["activations and buffers"] = peak - base - m["kv_cache_bytes"]
    return (out / 1e6).sort_index(level=["batch", "cache"], ascending=[True, False])


def cache_pays_from(sweep: pd.DataFrame) -> dict[int, int | None]:
    """Per batch size, the shortest generated length at which decoding with the cache is faster."""
    t = metric(sweep, "runtime_s", ["batch", "new_tokens", "cache"]).unstack("cache")
    faster = t[t["on"] < t["off"]].reset_index()
    batches = sorted(t.index.get_level_values("batch").unique())
    return {
        int(b): (int(faster[faster.batch == b].new_tokens.min()) if (faster.batch == b).any() else None)
        for b in batches
    }


def by_dtype(checks: pd.DataFrame) -> pd.DataFrame:
    """Cached against uncached decoding per dtype: identical tokens, first divergence, largest logit gap."""
    table = checks.pivot_table(index="dtype", columns="metric", values="value", sort=False)
    if "first_divergence_step" in table:  # -1: the tokens never diverged, so there is no such step
        table["first_divergence_step"] = table["first_divergence_step"].where(
            table["first_divergence_step"] >= 0
        )
    if "tokens_identical" in table:
        table["tokens_identical"] = table["tokens_identical"].astype(bool)
    return table


def finetune_table(stack: pd.DataFrame) -> pd.DataFrame:
    """The reference fine-tuning table (techniques stacked) from 02_lora's stack rows."""
    ok = wide(stack)
    out = pd.DataFrame(
        index=pd.Index([c for c in reference.STACKED if c in set(stack["config"])], name="technique")
    )
    out["peak_memory_mb"] = ok.get("peak_bytes", pd.Series(dtype=float)) / 1e6
    out["predicted_mb"] = ok.get("predicted_total_bytes", pd.Series(dtype=float)) / 1e6
    if "peak_live_bytes" in ok:  # CPU: the tensors' own peak, without the allocator's slack
        out["live_tensors_mb"] = ok["peak_live_bytes"] / 1e6
    out["runtime_per_step_s"] = ok.get("step_s")
    out["trainable_pct"] = ok.get("trainable_pct")
    for _, r in stack[stack["status"] != "ok"].iterrows():
        out.loc[r["config"], "status"] = f"{r['status']}: {r['reason']}"
    return out


def finetune_vs_reference(finetune: pd.DataFrame) -> pd.DataFrame:
    """The stacked-techniques table beside the reference's."""
    return reference.beside(finetune, reference.FINETUNE, ["technique"])


def step_changes(table: pd.DataFrame, column: str) -> pd.Series:
    """Each row's value relative to the row above it (how much one more technique changes the column)."""
    return table[column] / table[column].shift(1)


CONFIG_COLUMNS = {
    "peak_bytes": "peak_memory_mb",
    "peak_live_bytes": "live_tensors_mb",
    "predicted_total_bytes": "predicted_memory_mb",
    "predicted_weight_copies_bytes": "weight_copies_mb",
    "step_s": "runtime_per_step_s",
    "trainable_pct": "trainable_pct",
    "final_loss": "final_loss",
    "skipped_steps": "skipped_steps",
}


def config_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per fine-tuning configuration, in run order: memory measured and predicted, time, loss."""
    ok = wide(df)
    out = pd.DataFrame(index=pd.Index(df["config"].unique(), name="config"))
    for m, name in CONFIG_COLUMNS.items():
        if m in ok:
            out[name] = ok[m] / (1e6 if m.endswith("bytes") else 1)
    bad = df[df["status"] != "ok"].drop_duplicates("config").set_index("config")
    out["status"] = [f"{bad.status[c]}: {bad.reason[c]}"[:120] if c in bad.index else "ok" for c in out.index]
    return out


def precision_table(runs: pd.DataFrame) -> pd.DataFrame:
    """config_table of the precisions, with the speed of each relative to fp32."""
    table = config_table(runs)
    if "runtime_per_step_s" in table:
        table.insert(4, "speedup_vs_fp32", table.runtime_per_step_s.get("fp32") / table.runtime_per_step_s)
    return table


def memory_terms(runs: pd.DataFrame) -> pd.DataFrame:
    """The ledger's predicted terms and the measured peaks per configuration (MB), for ledger_bars."""
    terms = [
        m
        for m in runs["metric"].unique()
        if m.startswith("predicted_") or m in ("peak_bytes", "peak_live_bytes")
    ]
    return wide(runs[runs["metric"].isin(terms)]) / 1e6


def curves(df: pd.DataFrame, metric: str = "loss") -> pd.DataFrame:
    """A per-step metric's rows (loss, eval_loss, loss_scale) as columns config, step, value."""
    sel = df[(df["metric"] == metric) & (df["status"] == "ok")]
    return sel.astype({"step": int})[["config", "step", "value"]]


def trainable_table(params: pd.DataFrame) -> pd.DataFrame:
    """LoRA's trainable parameters (M and %) by rank (rows) and target set (columns)."""
    value = params.value.where(params.metric == "trainable_pct", params.value / 1e6)
    names = {"trainable_params": "trainable (M)", "trainable_pct": "trainable (%)"}
    share = params.assign(value=value, metric=params.metric.map(names))
    return share.pivot_table(index="r", columns=["targets", "metric"], values="value", sort=False)


def stack_comparison(rows: pd.DataFrame) -> pd.DataFrame:
    """Ours against transformers + PEFT (one row per stack): step time, tokens/s, memory (MB), parameters."""
    table = wide(rows[rows["stack"] != "ours/hf"], "stack")
    memory = [
        m
        for m in ("peak_allocated_bytes", "baseline_rss_bytes", "peak_rss_bytes", "added_rss_bytes")
        if m in table
    ]
    out = table.reindex(columns=["step_s", "tokens_per_s", *memory, "trainable_params"])
    out[memory] /= 1e6
    return out.rename(columns={m: m.replace("bytes", "mb") for m in memory})


def budget_table(
    budget: pd.DataFrame, budgets_gib: list[float], measured: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Predicted GiB of each configuration per model, whether it fits each budget, and (if given) the
    measured peak of this run's configurations."""
    totals = budget[budget["metric"] == "predicted_total_bytes"]
    gib = totals.pivot_table(index="config", columns="model", values="value", sort=False) / 2**30
    table = gib.map(lambda v: f"{v:.2f} GiB")
    for gb in budgets_gib:
        for model in gib.columns:
            table[f"{model} fits {gb} GiB"] = (gib[model] <= gb).map({True: "yes", False: "no"})
    if measured is not None and "peak_memory_mb" in measured:
        table["measured here (GiB)"] = (
            (measured["peak_memory_mb"] * 1e6 / 2**30).round(2).reindex(table.index)
        )
    return table


def smallest_budget(budget: pd.DataFrame, budgets_gib: list[float]) -> dict[str, dict[str, float | None]]:
    """Per model and configuration, the smallest budget (GiB) its predicted total fits, else None."""
    totals = budget[budget["metric"] == "predicted_total_bytes"]
    gib = totals.pivot_table(index="config", columns="model", values="value", sort=False) / 2**30
    return {
        m: {c: next((gb for gb in sorted(budgets_gib) if gib.loc[c, m] <= gb), None) for c in gib.index}
        for m in gib.columns
    }


def blocks_recomputed(checkpointing: int, n_layers: int) -> int:
    """How many of n_layers blocks recompute their activations when every n-th is checkpointed."""
    return len(range(0, n_layers, checkpointing)) if checkpointing else 0


def _memory_columns(ok: pd.DataFrame) -> dict[str, pd.Series]:
    cols = {
        "predicted activations (MB)": ok.predicted_activations_bytes / 1e6,
        "predicted total (MB)": ok.predicted_total_bytes / 1e6,
        "measured peak (MB)": ok.peak_bytes / 1e6,
    }
    if "peak_live_bytes" in ok:
        cols["live tensors (MB)"] = ok.peak_live_bytes / 1e6
    return cols


def checkpointing_table(runs: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Memory per checkpointing setting: blocks recomputed, predicted and measured peaks, the peak saved."""
    ok = wide(runs)
    n = runs.drop_duplicates("config").set_index("config").checkpointing.reindex(ok.index)
    table = pd.DataFrame(
        {"blocks recomputed": [blocks_recomputed(int(k), n_layers) for k in n], **_memory_columns(ok)}
    )
    table.index = ok.index
    table["peak saved (MB)"] = table["measured peak (MB)"].iloc[0] - table["measured peak (MB)"]
    return table


def activations_by_length(predicted: pd.DataFrame) -> pd.DataFrame:
    """Predicted saved activations (MB) by sequence length (rows) and checkpointing setting (columns)."""
    mb = predicted.assign(MB=predicted.value / 1e6)
    return mb.pivot_table(index="seq_len", columns="config", values="MB", sort=False)


def length_table(measured: pd.DataFrame, longest: dict[int, int]) -> pd.DataFrame:
    """Measured runs by max_len and setting: the longest micro-batch, predicted and measured memory."""
    ok = wide(measured, ["max_len", "config"])
    cols = _memory_columns(ok)
    lengths = [longest[int(m)] for m, _ in ok.index]
    return pd.DataFrame({"longest micro-batch (tokens)": lengths, **cols}, index=ok.index).sort_index()


def timing_table(grads: pd.DataFrame) -> pd.DataFrame:
    """Gradient errors and forward + backward time per setting, with the extra time against the first."""
    timed = wide(grads)
    timed["extra time (%)"] = 100 * (timed.backward_s / timed.backward_s.iloc[0] - 1)
    return timed


def gradient_errors(grads: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """The gradient errors of the ok comparison rows (backward time left out)."""
    errors = grads[(grads.status == "ok") & (grads.metric != "backward_s")]
    return errors.pivot_table(index=index, columns="metric", values="value", sort=False)


def checkpointing_pays(table: pd.DataFrame, timed: pd.DataFrame) -> pd.DataFrame:
    """Memory saved per percent of extra time, predicted (activations) and measured (peak)."""
    first = table.index[0]
    pays = pd.DataFrame(
        {
            "blocks recomputed": table["blocks recomputed"],
            "extra time (%)": timed["extra time (%)"],
            "activations saved (MB)": table["predicted activations (MB)"][first]
            - table["predicted activations (MB)"],
            "peak saved (MB)": table["peak saved (MB)"],
        }
    ).drop(first)
    slower = pays["extra time (%)"].where(pays["extra time (%)"] > 0)
    pays["MB per % time (predicted)"] = pays["activations saved (MB)"] / slower
    pays["MB per % time (measured)"] = pays["peak saved (MB)"] / slower
    return pays


def accumulation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Memory and time per micro-batch x accumulation split, predicted and measured."""
    ok = wide(runs)
    cols = runs.drop_duplicates("config").set_index("config").reindex(ok.index)
    return pd.DataFrame(
        {
            "micro-batch": cols.micro_batch.astype(int),
            "accumulation": cols.accum_steps.astype(int),
            "predicted activations (MB)": ok.predicted_activations_bytes / 1e6,
            "predicted logits (MB)": ok.predicted_logits_bytes / 1e6,
            **_memory_columns(ok),
            "optimizer step (s)": ok.step_s,
            "micro-step (s)": ok.micro_step_s,
            "target tokens/s": ok.tokens_per_s,
        }
    )


def accumulation_errors(grads: pd.DataFrame, targets: dict[int, list[int]]) -> pd.DataFrame:
    """Gradient errors per split and normalisation, with each split's target tokens per micro-batch."""
    table = gradient_errors(grads, ["split", "normalisation"])
    table["targets per micro-batch"] = [", ".join(map(str, targets[int(k)])) for k, _ in table.index]
    return table.rename_axis(["micro-batches", "normalisation"])


def run_curves(results_dir, stems: list[str]) -> pd.DataFrame:
    """Every training-loss curve a run saved: columns notebook, config, step, value."""
    from effllm.report import results

    found = []
    for stem in stems:
        for section in results.sections(results_dir, stem):
            df = results.load(results_dir, stem, section)
            if "config" in df and "step" in df and (df["metric"] == "loss").any():
                found.append(curves(df).assign(notebook=stem))
    return (
        pd.concat(found, ignore_index=True)
        if found
        else pd.DataFrame(columns=["notebook", "config", "step", "value"])
    )


def ladder_table(ladder: pd.DataFrame, bandwidth: float) -> pd.DataFrame:
    """07_quantization's ladder by path x batch: decode tokens/s, speed against fp32 and against the
    roofline (bandwidth / bytes read per token), compile time, peak memory and token identity."""
    idx = ["path", "batch"]
    df = ladder.astype({"batch": int})
    speed = metric(df, "decode_tokens_per_s", idx)
    per_token = metric(df, "read_bytes_per_token", idx)
    fp32 = speed.xs("fp32", level="path") if "fp32" in speed.index.get_level_values("path") else None
    out = pd.DataFrame(
        {
            "decode_tokens_per_s": speed,
            "speed_vs_fp32": speed / speed.index.get_level_values("batch").map(fp32)
            if fp32 is not None
            else None,
            "read_mb_per_token": per_token / 1e6,
            "roof_tokens_per_s": bandwidth / per_token,
            "share_of_roof_pct": 100 * speed * per_token / bandwidth,
            "compile_s": metric(df, "compile_s", idx),
            "peak_memory_mb": metric(df, peak_memory_metric(df), idx) / 1e6,
            "tokens_identical": metric(df, "tokens_identical", idx).astype(bool),
        }
    )
    order = list(dict.fromkeys(df["path"]))
    out = out.reindex(
        pd.MultiIndex.from_tuples(sorted(out.index, key=lambda k: (order.index(k[0]), k[1])), names=idx)
    )
    return out.dropna(axis=1, how="all")


def quality_table(quality: pd.DataFrame) -> pd.DataFrame:
    """Each path's weights against fp32: held-out perplexity and its change, top-1 agreement, logit gap."""
    out = wide(quality, "path")
    if "fp32" in out.index:
        out.insert(1, "perplexity_change_pct", 100 * (out["perplexity"] / out.loc["fp32", "perplexity"] - 1))
    if "top1_agreement" in out:
        out["top1_agreement"] *= 100
    return out.rename(columns={"top1_agreement": "top1_agreement_pct"})


def attention_table(attention: pd.DataFrame, metric_name: str = "runtime_s") -> pd.DataFrame:
    """One attention metric by batch x length, one column per kernel (NaN where it did not run)."""
    df = attention.astype({"batch": int, "length": int})
    sel = df[(df["metric"] == metric_name) & (df["status"] == "ok")]
    return sel.pivot_table(index=["batch", "length"], columns="kernel", values="value", sort=False)


def ladder_summary(ladder: pd.DataFrame, quality: pd.DataFrame | None) -> pd.DataFrame:
    """The decoding ladder in one row per path: decode tokens/s per batch size, and (ours) the held-out
    perplexity's change from fp32."""
    df = ladder.astype({"batch": int})
    speed = metric(df, "decode_tokens_per_s", ["path", "batch"]).unstack("batch")
    speed.columns = [f"batch {b} (tokens/s)" for b in speed.columns]
    speed = speed.reindex([p for p in dict.fromkeys(df["path"]) if p in speed.index])
    if quality is not None and (quality["metric"] == "perplexity").any():
        change = quality_table(quality).get("perplexity_change_pct")
        if change is not None:
            speed["perplexity_change_pct"] = change.reindex(
                [p.removesuffix(" compiled") for p in speed.index]
            ).to_numpy()
    return speed


def fastest(table: pd.DataFrame, paths, batch: int = 1) -> str | None:
    """The path among `paths` with the most decode tokens/s at `batch` (None when none ran)."""
    speed = (
        table["decode_tokens_per_s"].dropna() if "decode_tokens_per_s" in table else pd.Series(dtype=float)
    )
    ours = speed[[p in paths and b == batch for p, b in speed.index]]
    return ours.idxmax()[0] if len(ours) else None


def step_profile(profile: pd.DataFrame) -> pd.DataFrame:
    """Milliseconds per generated token and share of the step, by op."""
    t = profile.set_index("op")["value"]
    return pd.DataFrame({"ms_per_token": 1e3 * t, "share_pct": 100 * t / t.sum()})


def lora_twins(runs: pd.DataFrame) -> dict[str, str]:
    """Each configuration on a 4-bit base -> the one on the full-precision base with the same precision
    and adapters (and the same checkpointing where there is one): what it is set against."""
    setting = runs.drop_duplicates("config").set_index("config")
    if "quantize_base" not in setting:
        return {}
    same = lambda a, b, cols: all(str(setting[k][a]) == str(setting[k][b]) for k in cols if k in setting)
    full = setting.index[setting["quantize_base"].isna()]
    out = {}
    for c in setting.index[setting["quantize_base"].notna()]:
        like = [f for f in full if same(c, f, ("precision", "lora_targets"))]
        matched = [f for f in like if same(c, f, ("checkpointing",))]
        if like:
            out[c] = (matched or like)[0]
    return out


def qlora_table(runs: pd.DataFrame) -> pd.DataFrame:
    """config_table of the 4-bit fine-tuning configurations, with the held-out loss after training and
    each QLoRA configuration against LoRA in the same precision (step time and held-out loss)."""
    table = config_table(runs)
    held = curves(runs, "eval_loss").sort_values("step").groupby("config", sort=False)["value"].last()
    table.insert(len(table.columns) - 1, "held_out_loss", held.reindex(table.index))
    twins = lora_twins(runs)
    twin = [twins.get(c) for c in table.index]
    for column, name in (("runtime_per_step_s", "step_time_vs_lora"), ("held_out_loss", "held_out_vs_lora")):
        if column in table:
            base = [table[column].get(t) if t else None for t in twin]
            table.insert(
                len(table.columns) - 1, name, table[column] / pd.Series(base, table.index, dtype=float)
            )
    return table


def storage_table(storage: pd.DataFrame) -> pd.DataFrame:
    """Per kind of block linear: fp32 and NF4 megabytes, their ratio and the NF4 relative error."""
    size = storage[storage.metric == "weights_bytes"].pivot_table(
        index="kind", columns="format", values="value", sort=False
    )
    out = pd.DataFrame({"fp32 (MB)": size["fp32"] / 1e6, "nf4 (MB)": size["nf4"] / 1e6})
    out["nf4 / fp32"] = size["nf4"] / size["fp32"]
    out["relative error"] = metric(storage, "relative_error", ["kind"])
    out.loc["all"] = [
        out["fp32 (MB)"].sum(),
        out["nf4 (MB)"].sum(),
        size["nf4"].sum() / size["fp32"].sum(),
        float("nan"),
    ]
    return out


def dequantize_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Dequantizing each kind of layer against its matmul, milliseconds, by dtype."""
    ok = cost[cost.status == "ok"].pivot_table(
        index=["kind", "dtype"], columns="metric", values="value", sort=False
    )
    out = pd.DataFrame({"dequantize (ms)": ok.dequantize_s * 1e3, "matmul (ms)": ok.matmul_s * 1e3})
    out["dequantize / matmul"] = ok.dequantize_s / ok.matmul_s
    return out


def qat_table(qat: pd.DataFrame) -> pd.DataFrame:
    """Held-out perplexity of each model (rows) in fp32 arithmetic and on the int4 kernel (bf16)."""
    ppl = qat[(qat.metric == "perplexity") & (qat.status == "ok")]
    table = ppl.pivot_table(index="model", columns="arithmetic", values="value", sort=False)
    return table.rename(columns={"fp32": "fp32 arithmetic", "bf16": "bf16 (int4 rows: on the int4 kernel)"})
