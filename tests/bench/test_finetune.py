import pytest

from effllm.bench import finetune as finetune_bench


def test_ours_and_transformers_peft_reach_the_same_loss_on_the_same_steps():
    kw = dict(model="tiny", precision="fp32", lora=True, checkpointing=1, batch_size=2, seq_len=32, steps=3)
    ours = finetune_bench.step_metrics(stack="ours", **kw)
    hf = finetune_bench.step_metrics(stack="hf", **kw)
    assert ours["final_loss"] == pytest.approx(hf["final_loss"], abs=1e-4)
    assert ours["step_s"] > 0 and hf["step_s"] > 0


def test_compare_gives_ratio_rows_for_time_and_memory():
    rows = finetune_bench.compare(model="tiny", batch_size=2, seq_len=16, steps=2)
    metrics = {r["metric"] for r in rows}
    assert {"step_s", "peak_rss_bytes", "added_rss_bytes", "step_s_ratio", "added_rss_bytes_ratio"} <= metrics
    ratios = [r for r in rows if r["stack"] == "ours/hf"]
    assert len(ratios) == 2 and all(r["status"] == "ok" and r["value"] > 0 for r in ratios)
