"""The report's key findings: each notebook's headline ratios, as sentences formatted from its results.

The summary notebook opens the report with `key_findings(results_dir)` (one bullet per notebook, linked
to its section) and `not_run(results_dir)` (every notebook that failed and every configuration that did
not run, with the reason). Nothing here measures; a notebook whose results are missing says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from effllm.report import reference, results, tables
from effllm.report.display import number


def _faster(ratio: float) -> str:
    """A speed ratio (new / old speed) in words: "**2.30x faster**" or "**1.20x slower**"."""
    return f"**{ratio:.2f}x faster**" if ratio >= 1 else f"**{1 / ratio:.2f}x slower**"


class Missing(Exception):
    """A result a headline needs is not in this run (the notebook failed, or did not run)."""


def _load(results_dir: Path, stem: str, section: str) -> pd.DataFrame:
    df, why = results.try_load(results_dir, stem, section)
    if df is None:
        raise Missing(why)
    return df


def _value(df: pd.DataFrame, metric: str, **where) -> float:
    """The one ok value of `metric` in the rows matching column=value pairs, else Missing."""
    sel = df[(df["metric"] == metric) & (df["status"] == "ok")]
    for col, val in where.items():
        sel = sel[sel[col].astype(str) == str(val)]
    if sel.empty or pd.isna(sel["value"].iloc[0]):
        shown = ", ".join(f"{k}={v}" for k, v in where.items())
        raise Missing(f"no measured {metric}" + (f" for {shown}" if shown else ""))
    return float(sel["value"].iloc[0])


def kv_cache(results_dir: Path) -> str:
    table = _load(results_dir, "01_kv_cache", "table")
    ours = table[table["impl"] == "ours"]
    b = int(ours["batch"].max())
    on, off = (_value(ours, "runtime_s", batch=b, cache=c) for c in ("on", "off"))
    n = int(ours["new_tokens"].iloc[0])
    text = (
        f"with the KV cache, {n} new tokens at batch {b} take {number(on)} s instead of {number(off)} s "
        f"({_faster(off / on)})"
    )
    if (table["impl"] == "transformers").any():
        hf = _value(table[table["impl"] == "transformers"], "tokens_per_s", batch=b, cache="on")
        text += f"; our Llama decodes at **{_value(ours, 'tokens_per_s', batch=b, cache='on') / hf:.2f}x** "
        text += "transformers' tokens/s (cached)"
    roof, _ = results.try_load(results_dir, "01_kv_cache", "roofline")
    if roof is not None:
        frac = _value(roof, "fraction_of_limit")
        text += f"; batch-1 decoding reaches {frac:.0%} of the memory-bandwidth limit"
    return text + "."


def lora(results_dir: Path) -> str:
    stack = _load(results_dir, "02_lora", "stack")
    base, last = reference.STACK[0], reference.STACK[-1]
    pct = _value(stack, "trainable_pct", config=last)
    p0, p1 = (_value(stack, "peak_bytes", config=c) / 1e6 for c in (base, last))
    t0, t1 = (_value(stack, "step_s", config=c) for c in (base, last))
    text = (
        f"LoRA trains {pct:.2f}% of the parameters; with mixed precision and checkpointing below it, the "
        f"peak goes from {p0:,.0f} MB to {p1:,.0f} MB (**x{p1 / p0:.2f}**) and the step from {number(t0)} s "
        f"to {number(t1)} s (x{t1 / t0:.2f}, reference settings)"
    )
    peft, _ = results.try_load(results_dir, "02_lora", "peft")
    if peft is not None:
        text += (
            f"; against transformers + PEFT our step takes **x{_value(peft, 'step_s_ratio'):.2f}** the time"
        )
    return text + ". " + learned(results_dir)


def learned(results_dir: Path) -> str:
    """How far the LoRA fine-tune that learns took the held-out loss."""
    learn = _load(results_dir, "02_lora", "learn")
    evals = learn[(learn["metric"] == "eval_loss") & (learn["status"] == "ok")].sort_values("step")
    if len(evals) < 2:
        raise Missing("the LoRA fine-tune saved fewer than two held-out losses")
    a, b = evals["value"].iloc[0], evals["value"].iloc[-1]
    steps = int(evals["step"].iloc[-1])
    return (
        f"Fine-tuned with LoRA for {steps} steps, the held-out loss goes from {a:.3f} to {b:.3f} "
        f"(**{(b - a) / a:+.1%}**)."
    )


def amp(results_dir: Path) -> str:
    runs = _load(results_dir, "03_amp", "runs")
    fp32 = _value(runs, "step_s", config="fp32")
    speeds = []
    for config in ("bf16", "fp16", "bf16-pure"):
        try:
            speeds.append(f"{_faster(fp32 / _value(runs, 'step_s', config=config))} with {config}")
        except Missing:
            speeds.append(f"{config} did not run")
    text = f"against fp32, a training step runs {', '.join(speeds)}"
    matmul, _ = results.try_load(results_dir, "03_amp", "matmul")
    if matmul is not None:
        rates = {d: _value(matmul, "matmul_flop_s", dtype=d) / 1e9 for d in matmul["dtype"].unique()}
        text += "; matmuls run at " + ", ".join(f"{v:,.0f} GFLOP/s in {d}" for d, v in rates.items())
    support = _meta(results_dir, "03_amp").get("half_precision_support", {})
    if "AVX-512 FP16 arithmetic" in support:
        text += f" (AVX-512 FP16 here: {support['AVX-512 FP16 arithmetic']})"
    return text + "."


def checkpointing(results_dir: Path) -> str:
    runs = _load(results_dir, "04_checkpointing", "runs")
    grads = _load(results_dir, "04_checkpointing", "gradients")
    none, every = "none", "every block"
    p0, p1 = (_value(runs, "peak_bytes", config=c) / 1e6 for c in (none, every))
    plain = grads[grads["lora"].astype(str) == "False"]
    t0, t1 = (_value(plain, "backward_s", config=c) for c in (none, every))
    err = grads[grads["metric"] == "relative_error"]["value"].max()
    same = "are identical to" if err == 0 else f"match, to a relative error of {err:.1e},"
    return (
        f"checkpointing every block takes the peak from {p0:,.0f} MB to {p1:,.0f} MB "
        f"(**{p1 - p0:+,.0f} MB**) at {t1 / t0 - 1:+.0%} forward + backward time; its gradients {same} "
        "the plain run's."
    )


def accumulation(results_dir: Path) -> str:
    runs = _load(results_dir, "05_accumulation", "runs")
    grads = _load(results_dir, "05_accumulation", "gradients")
    configs = list(runs["config"].unique())
    big, small = configs[0], configs[-1]
    p0, p1 = (_value(runs, "peak_bytes", config=c) / 1e6 for c in (big, small))
    t0, t1 = (_value(runs, "step_s", config=c) for c in (big, small))
    errors = grads[grads["metric"] == "relative_error"].groupby("normalisation")["value"].max()
    text = (
        f"splitting one optimizer step of {big} (micro-batch x accumulation) into {small} takes the peak "
        f"from {p0:,.0f} MB to {p1:,.0f} MB (x{p1 / p0:.2f}) and the step from {t0:.2f} s to {t1:.2f} s"
    )
    if {"tokens", "mean"} <= set(errors.index):
        text += (
            f"; token-normalised accumulation matches one large batch to {errors['tokens']:.1e}, the naive "
            f"mean of micro-batch means is off by **{errors['mean']:.0%}**"
        )
    return text + "."


def quantization(results_dir: Path) -> str:
    rows = _load(results_dir, "07_quantization", "ladder")
    speed = rows[(rows["metric"] == "decode_tokens_per_s") & (rows["status"] == "ok")].astype({"batch": int})
    ours = speed[speed["impl"] == "ours"]
    if ours.empty:
        raise Missing("no path of the decoding ladder ran")
    parts = []
    for batch, group in ours.groupby("batch"):
        best = group.loc[group["value"].idxmax()]
        text = f"at batch {batch} the fastest path, {best['path']}, decodes {best['value']:,.1f} tokens/s"
        for anchor in ("fp32", "llama.cpp", "transformers fp32"):
            other = speed[(speed["path"] == anchor) & (speed["batch"] == batch)]
            if len(other) and anchor != best["path"]:
                text += f", **{best['value'] / other['value'].iloc[0]:.2f}x** {anchor}"
        parts.append(text)
    quality, _ = results.try_load(results_dir, "07_quantization", "quality")
    if quality is not None:
        ppl = quality[(quality["metric"] == "perplexity") & (quality["status"] == "ok")].set_index("path")[
            "value"
        ]
        if "fp32" in ppl and len(ppl) > 1:
            change = {p: 100 * (v / ppl["fp32"] - 1) for p, v in ppl.drop("fp32").items()}
            worst = max(change, key=lambda p: abs(change[p]))
            parts.append(f"held-out perplexity moves at most {change[worst]:+.2f}% from fp32 ({worst})")
    return "; ".join(parts) + "."


def qlora(results_dir: Path) -> str:
    runs = _load(results_dir, "08_qlora", "runs")
    setting = runs.drop_duplicates("config").set_index("config")
    parts = []
    for cfg, twin in tables.lora_twins(runs).items():
        if setting.checkpointing[cfg] != setting.checkpointing[twin]:
            continue  # the headline sets like against like
        try:
            p0, p1 = (_value(runs, "peak_bytes", config=c) / 1e6 for c in (twin, cfg))
            t0, t1 = (_value(runs, "step_s", config=c) for c in (twin, cfg))
        except Missing:
            continue
        parts.append(
            f"{cfg} against {twin}: peak {p0:,.0f} to {p1:,.0f} MB (**x{p1 / p0:.2f}**), step x{t1 / t0:.2f}"
        )
    if not parts:
        raise Missing("no QLoRA configuration ran beside its LoRA twin")
    qat, _ = results.try_load(results_dir, "08_qlora", "qat")
    if qat is not None:
        gaps = qat[
            (qat["metric"] == "gap_recovered") & (qat["status"] == "ok") & (qat["arithmetic"] == "fp32")
        ]
        for _, r in gaps.iterrows():
            parts.append(
                f"QAT recovers **{r['value']:.0%}** of the int4 g{int(r['group_size'])} post-training gap"
            )
    return "; ".join(parts) + "."


HEADLINES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "01_kv_cache": ("KV caching", kv_cache),
    "02_lora": ("LoRA", lora),
    "03_amp": ("Mixed precision", amp),
    "04_checkpointing": ("Activation checkpointing", checkpointing),
    "05_accumulation": ("Gradient accumulation", accumulation),
    "07_quantization": ("Fast decoding", quantization),
    "08_qlora": ("4-bit fine-tuning", qlora),
}


def key_findings(results_dir: str | Path) -> str:
    """One Markdown bullet per notebook: its headline ratios, linked to its section of the report."""
    lines = []
    for stem, (title, headline) in HEADLINES.items():
        try:
            text = headline(Path(results_dir))
        except Missing as e:
            text = f"not measured in this run: {e}"
        lines.append(f"- **[{title}](#nb-{stem})**: {text[:1].upper()}{text[1:]}")
    return "\n".join(lines)


def not_run(results_dir: str | Path) -> str:
    """What did not run, with the reason: failed notebooks, then configurations that failed."""
    results_dir = Path(results_dir)
    lines = []
    for stem, entry in _record(results_dir).get("notebooks", {}).items():
        if entry.get("status") not in ("ok", None) and not stem.endswith("summary"):
            err = entry.get("error") or {}
            lines.append(f"- **{stem}** {entry['status']}: {err.get('ename', '?')}: {err.get('evalue', '')}")
    for stem in HEADLINES:
        for section in results.sections(results_dir, stem):
            df = results.load(results_dir, stem, section)
            bad = df[df["status"] != "ok"]
            for (status, reason), group in bad.groupby(["status", "reason"], sort=False):
                where = _configs(group)
                lines.append(f"- {stem} / {section}{where}: **{status}**: {reason or 'no reason recorded'}")
    return (
        "\n".join(lines) if lines else "Everything ran: no notebook failed and no configuration was skipped."
    )


def _configs(rows: pd.DataFrame) -> str:
    for col in ("config", "path", "kernel", "dtype", "stack"):
        if col in rows:
            names = [str(v) for v in rows[col].dropna().unique()]
            if names:
                return f" ({', '.join(names)})"
    return ""


def _meta(results_dir: Path, stem: str) -> dict:
    try:
        return json.loads((results_dir / stem / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _record(results_dir: Path) -> dict:
    try:
        return json.loads((results_dir.parent / "run.json").read_text())
    except (OSError, ValueError):
        return {}
