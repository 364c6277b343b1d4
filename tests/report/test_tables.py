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


def ladder_rows() -> list[dict]:
    """07_quantization rows: fp32 and int4 at batches 1 and 4, llama.cpp at batch 1, one skipped row."""
    rows = []
    for path, impl, batch, speed, mb in (
        ("fp32", "ours", 1, 10.0, 500),
        ("fp32", "ours", 4, 30.0, 130),
        ("int4 g32", "ours", 1, 50.0, 100),
        ("int4 g32", "ours", 4, 120.0, 30),
        ("llama.cpp", "llama.cpp", 1, 100.0, None),
    ):
        p = dict(path=path, impl=impl, batch=batch)
        rows.append(row("decode_tokens_per_s", speed, **p))
        if mb:
            rows += [row("read_bytes_per_token", mb * 1e6, **p), row("peak_rss_bytes", 1e9, **p)]
    rows.append(row("tokens_identical", True, path="fp32", impl="ours", batch=1))
    reason = "llama-cpp-python's Llama decodes one sequence at a time (batch 1 only)"
    rows.append(row("decode_tokens_per_s", None, status="skipped", reason=reason, path="llama.cpp", batch=4))
    return rows


def test_ladder_table_sets_each_path_against_fp32_and_the_bandwidth_roof():
    table = tables.ladder_table(pd.DataFrame(ladder_rows()), bandwidth=10e9)
    assert list(table.index)[:2] == [("fp32", 1), ("fp32", 4)]  # run order, then batch
    assert table.loc[("int4 g32", 4), "speed_vs_fp32"] == 4.0
    assert table.loc[("int4 g32", 1), "roof_tokens_per_s"] == 100.0  # 10 GB/s over 100 MB per token
    assert table.loc[("int4 g32", 1), "share_of_roof_pct"] == 50.0
    assert math.isnan(table.loc[("llama.cpp", 1), "share_of_roof_pct"])  # its bytes are not counted
    assert tables.fastest(table, ["fp32", "int4 g32"], batch=1) == "int4 g32"
    text = findings.ladder(table, pd.DataFrame(ladder_rows()), bandwidth=10e9, linear=5e9)
    assert "our fastest path is **int4 g32** at 50.0 tokens/s, **0.50x** llama.cpp (100.0)" in text
    assert "reads its weights at 5.0 GB/s here (50% of it)" in text
    assert "The compiled fp32" not in text  # no compiled path ran


def test_quality_and_summary_tables_compare_with_fp32():
    quality = pd.DataFrame(
        [
            row("perplexity", 10.0, path="fp32"),
            row("top1_agreement", 1.0, path="fp32"),
            row("perplexity", 10.5, path="int4 g32"),
            row("top1_agreement", 0.75, path="int4 g32"),
            row("perplexity", None, path="int4 from Q4_1", status="unsupported", reason="not a .gguf file"),
        ]
    )
    q = tables.quality_table(quality)
    assert (
        math.isclose(q.loc["int4 g32", "perplexity_change_pct"], 5.0)
        and q.loc["int4 g32", "top1_agreement_pct"] == 75
    )
    assert "**int4 g32's +5.00%**" in findings.quality(q) and "75.0% to 75.0%" in findings.quality(q)
    summary = tables.ladder_summary(pd.DataFrame(ladder_rows()), quality)
    assert summary.loc["int4 g32", "batch 4 (tokens/s)"] == 120.0
    assert math.isclose(summary.loc["int4 g32", "perplexity_change_pct"], 5.0)
    assert math.isnan(summary.loc["llama.cpp", "perplexity_change_pct"])


def test_attention_findings_compare_each_kernel_with_sdpa_math_at_the_longest_shared_length():
    rows = []
    for kernel, t, peak in (("sdpa math", 4.0, 100e6), ("sdpa flash", 1.0, 10e6)):
        for length, scale in ((128, 0.1), (1024, 1.0)):
            p = dict(kernel=kernel, batch=1, length=length)
            rows += [row("runtime_s", t * scale, **p), row("peak_bytes", peak * scale, **p)]
    rows.append(
        row("runtime_s", None, status="skipped", reason="over", kernel="sdpa math", batch=1, length=4096)
    )
    rows.append(row("runtime_s", 5.0, kernel="sdpa flash", batch=1, length=4096))
    att = pd.DataFrame(rows)
    times, peaks = tables.attention_table(att), tables.attention_table(att, "peak_bytes")
    text = findings.attention(times, peaks)
    assert "At batch 1 and 1024 tokens, sdpa flash runs **4.00x faster** than sdpa math with 0.1x" in text
