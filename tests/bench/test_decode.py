import torch

import effllm
from effllm.bench import decode as decode_bench


def test_decode_metrics_reports_times_and_the_cache_ledger():
    res = decode_bench.decode_metrics(model="tiny", batch_size=2, prompt_len=8, new_tokens=4, repeats=2)
    assert res["tokens_per_s"] > 0 and res["runtime_min_s"] <= res["runtime_s"] <= res["runtime_max_s"]
    assert res["prefill_s"] > 0 and res["decode_s"] > 0
    args = effllm.load_model("tiny").args
    assert res["kv_cache_bytes"] == effllm.kv_cache_bytes(args, 2, 12)


def test_transformers_reference_runs_the_same_configuration():
    res = decode_bench.decode_metrics(
        model="tiny",
        impl="transformers",
        batch_size=1,
        prompt_len=8,
        new_tokens=4,
        repeats=1,
        use_cache=False,
    )
    assert res["tokens_per_s"] > 0 and res["kv_cache_bytes"] == 0


def test_decode_table_has_a_row_per_metric_and_configuration():
    rows = decode_bench.decode_table(
        model="tiny", batch_sizes=[1], prompt_len=4, new_tokens=2, repeats=1, impls=("ours",)
    )
    got = {(r["cache"], r["metric"]) for r in rows}
    assert ("on", "peak_rss_bytes") in got and ("off", "tokens_per_s") in got
    assert all(r["status"] == "ok" for r in rows)


def test_failed_configuration_is_one_row_with_its_reason(monkeypatch):
    monkeypatch.setattr(
        decode_bench.measure, "isolated", lambda *a, **k: {"status": "oom", "reason": "killed"}
    )
    rows = decode_bench.decode_table(
        model="tiny",
        batch_sizes=[16],
        prompt_len=4,
        new_tokens=2,
        repeats=1,
        impls=("ours",),
        caches=(False,),
    )
    assert [(r["batch"], r["metric"], r["status"], r["reason"]) for r in rows] == [
        (16, "runtime_s", "oom", "killed")
    ]


def test_cache_agreement_is_exact_in_fp32_and_measured_in_bf16():
    model = effllm.load_model("tiny")
    ids = decode_bench.prompts(model.args.vocab_size, 2, 6)
    fp32 = decode_bench.cache_agreement(model, ids, new_tokens=8)
    assert fp32["tokens_identical"] and fp32["max_logit_diff"] < 1e-4
    bf16 = decode_bench.cache_agreement(model.to(torch.bfloat16), ids, new_tokens=8)
    assert 0.0 <= bf16["max_logit_diff"] < 0.1 and isinstance(bf16["first_divergence_step"], int)


def test_length_sweep_times_both_paths():
    rows = decode_bench.length_sweep(effllm.load_model("tiny"), batch_sizes=[1], lengths=[2, 4], prompt_len=4)
    assert {(r["new_tokens"], r["cache"]) for r in rows} == {(2, "on"), (2, "off"), (4, "on"), (4, "off")}
