"""Print a report run's headline tables as markdown, for the README.

Usage: `python scripts/readme_tables.py reports/cpu`. The numbers come from the run's tidy results and
run.json, never typed by hand.
"""

import json
import re
import sys
from pathlib import Path

import pandas as pd

from effllm.report import display, findings, headlines, provenance, results, tables


def markdown(df: pd.DataFrame, formats: dict[str, str]) -> str:
    """A pipe table of the index and the formatted columns (missing values shown as an em dash)."""
    index = list(df.index.names)
    df = df.reset_index()
    cols = [*index, *formats]
    lines = ["| " + " | ".join(map(display.label, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [str(r[c]) for c in index]
        cells += ["—" if pd.isna(r[c]) else format(r[c], f) for c, f in formats.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(run: Path) -> None:
    record = json.loads((run / "run.json").read_text())
    cpu = dict(provenance.describe(record["provenance"])["Hardware"])["CPU"]
    walls = ", ".join(f"{stem} {nb['wall_s'] / 60:.1f} min" for stem, nb in record["notebooks"].items())
    total = sum(nb["wall_s"] for nb in record["notebooks"].values()) / 60
    date = record["provenance"]["date_utc"]
    print(f"Run `{record['run']}` (profile `{record['profile']}`), {date}, {cpu}.")
    print(f"Wall time {total:.1f} min: {walls}.\n")
    key = re.sub(r"\[([^\]]+)\]\(#[^)]+\)", r"\1", headlines.key_findings(run / "results"))  # no anchors
    print(key + "\n")

    inference = tables.inference_table(results.load(run / "results", "01_kv_cache", "table"))
    columns = {
        "peak_memory_gb": ".2f",
        "runtime_s": ".2f",
        "delta_runtime_s": ".2f",
        "tokens_per_s": ".1f",
        "transformers_tokens_per_s": ".1f",
        "speedup_vs_transformers": ".2f",
        "kv_cache_mb": ".1f",
    }
    print(markdown(inference, {k: f for k, f in columns.items() if k in inference}))
    print()
    finetune = tables.finetune_table(results.load(run / "results", "02_lora", "stack"))
    columns = {
        "peak_memory_mb": ",.0f",
        "live_tensors_mb": ",.0f",
        "predicted_mb": ",.0f",
        "runtime_per_step_s": ".2f",
        "trainable_pct": ".2f",
    }
    print(markdown(finetune, {k: f for k, f in columns.items() if k in finetune}))
    print("\n" + "\n".join(findings.technique_changes(finetune)))
    ladder, _ = results.try_load(run / "results", "07_quantization", "ladder")
    if ladder is not None:
        quality, _ = results.try_load(run / "results", "07_quantization", "quality")
        summary = tables.ladder_summary(ladder, quality)
        print()
        print(markdown(summary, {c: ".2f" if c.endswith("pct") else ".1f" for c in summary.columns}))
    runs, _ = results.try_load(run / "results", "08_qlora", "runs")
    if runs is not None:
        qlora = tables.qlora_table(runs)
        columns = {
            "peak_memory_mb": ",.0f",
            "live_tensors_mb": ",.0f",
            "predicted_memory_mb": ",.0f",
            "runtime_per_step_s": ".2f",
            "step_time_vs_lora": ".2f",
            "held_out_loss": ".3f",
            "held_out_vs_lora": ".3f",
        }
        print()
        print(markdown(qlora, {k: f for k, f in columns.items() if k in qlora}))
        print("\n" + findings.qlora(qlora, runs))
    qat, _ = results.try_load(run / "results", "08_qlora", "qat")
    if qat is not None:
        table = tables.qat_table(qat)
        print()
        print(markdown(table, dict.fromkeys(table.columns, ".3f")))
        print("\n" + findings.qat(table, qat))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "reports/cpu"))
