"""Headline tables and the reasons given where this run disagrees with the reference."""

import math

import pandas as pd

from effllm.bench.rows import row
from effllm.report import findings, reference, tables


def decode_rows(runtime: dict, impl: str = "ours") -> list[dict]:
    """Tidy 01_kv_cache rows for {(batch, cache): runtime_s}, 10 new tokens per sequence."""
    rows = []
    for (batch, cache), seconds in runtime.items():
        p = dict(impl=impl, batch=batch, cache=cache)
        rows += [
            row("runtime_s", seconds, **p),
            row("tokens_per_s", batch * 10 / seconds, **p),
            row("prefill_s", seconds / 10, **p),
            row("decode_s", seconds * 0.9, **p),
            row("kv_cache_bytes", 1e6 * batch if cache == "on" else 0, **p),
            row("peak_rss_bytes", 1e9 + 1e6 * batch, **p),
        ]
    return rows


def test_inference_table_has_delta_runtime_speedup_and_failures():
    ours = decode_rows({(1, "on"): 1.0, (1, "off"): 1.5, (8, "on"): 2.0, (8, "off"): 6.0})
    hf = decode_rows({(1, "on"): 2.0, (8, "on"): 4.0}, impl="transformers")
    failed = row("runtime_s", None, status="oom", reason="needs 9 GB", impl="ours", batch=16, cache="off")
    table = tables.inference_table(pd.DataFrame(ours + hf + [failed]))
    assert table.loc[(8, "off"), "delta_runtime_s"] == 4.0
    assert math.isnan(table.loc[(1, "on"), "delta_runtime_s"])  # not applicable to the cached row
    assert table.loc[(8, "on"), "speedup_vs_transformers"] == 2.0
    assert math.isnan(table.loc[(1, "off"), "speedup_vs_transformers"])
    assert table.loc[(16, "off"), "status"] == "oom: needs 9 GB"
    assert list(table.index)[:2] == [(1, "on"), (1, "off")]


def test_cache_pays_from_the_shortest_length_where_it_is_faster():
    rows = []
    for batch, times in {1: {8: (1.0, 0.9), 16: (1.2, 1.3), 32: (1.5, 2.0)}, 4: {8: (1.0, 0.5)}}.items():
        for n, (on, off) in times.items():
            rows += [
                row("runtime_s", on, batch=batch, new_tokens=n, cache="on"),
                row("runtime_s", off, batch=batch, new_tokens=n, cache="off"),
            ]
    assert tables.cache_pays_from(pd.DataFrame(rows)) == {1: 16, 4: None}


def stacked(peak_mb: list[float], step_s: list[float], techniques=reference.STACK) -> pd.DataFrame:
    return pd.DataFrame({"peak_memory_mb": peak_mb, "runtime_per_step_s": step_s}, index=list(techniques))


def test_technique_changes_agree_with_the_reference_where_directions_match():
    # the reference's directions: mixed precision faster and smaller, checkpointing slower and smaller,
    # LoRA faster and smaller
    lines = findings.technique_changes(stacked([1000, 500, 400, 300], [1.0, 0.5, 0.6, 0.5]))
    assert len(lines) == 3 and all(line.endswith("as in the reference.") for line in lines)
    assert findings.technique_changes(stacked([1000, 500, 400, 300], [1.0, 0.5, 0.6, 0.5]), True) == []


def test_each_opposite_direction_gets_its_own_reason():
    # mixed precision: faster but larger (bf16 on a CPU); checkpointing: slower and larger
    lines = findings.technique_changes(
        stacked([1000, 1200, 1300, 600], [1.0, 0.7, 0.9, 0.8]), only_differing=True
    )
    assert len(lines) == 2
    amp, ckpt = lines
    assert "+ Mixed precision" in amp and "peak memory x1.20" in amp
    assert findings.WHY["+ Mixed precision"]["peak memory"] in amp
    assert findings.WHY["+ Mixed precision"]["step time"] not in amp
    assert findings.WHY["+ Checkpointing"]["peak memory"] in ckpt


def test_a_missing_technique_is_skipped_not_compared_with_the_wrong_row():
    table = stacked([1000, 1300, 600], [1.0, 0.9, 0.8], techniques=[reference.STACK[0], *reference.STACK[2:]])
    lines = findings.technique_changes(table)
    assert [line.split("**")[1] for line in lines] == ["+ LoRA"]


def test_disagreements_explain_a_larger_cache_saving_on_a_cpu():
    inference = tables.inference_table(
        pd.DataFrame(decode_rows({(1, "on"): 1.0, (1, "off"): 3.0, (16, "on"): 2.0, (16, "off"): 40.0}))
    )
    notes = findings.disagreements(inference, None, device="cpu")
    assert len(notes) == 2
    assert "batch 16" in notes[1] and "**20.0x**" in notes[1] and findings.CACHE_WHY[True] in notes[1]


def test_memory_table_splits_the_peak_by_the_ledger_with_integer_batches():
    rows = decode_rows({(1, "on"): 1.0, (8, "on"): 2.0})
    for batch in (1, 8):
        p = dict(impl="ours", batch=float(batch), cache="on")  # as read back from a CSV with gaps
        rows += [row("weights_bytes", 5e8, **p), row("baseline_rss_bytes", 8e8, **p)]
    table = tables.memory_table(pd.DataFrame(rows))
    assert list(table.index) == [(1, "on"), (8, "on")]
    at8 = table.loc[(8, "on")]
    assert at8["Python, torch, libraries"] == 300 and at8["KV cache (formula)"] == 8
    assert at8["activations and buffers"] == 1008 - 800 - 8
