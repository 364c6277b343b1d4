"""08_qlora's tables, prose and headline from hand-made rows: each number is the one the rows hold."""

import math

import pandas as pd

from effllm.bench.rows import row
from effllm.report import findings, headlines, results, tables

# config -> (precision, quantize_base, checkpointing, step_s, peak MB, predicted MB, held-out loss)
CONFIGS = {
    "LoRA fp32": ("fp32", None, 0, 2.0, 1000, 900, 1.50),
    "LoRA bf16": ("bf16", None, 0, 1.0, 1200, 1000, 1.52),
    "QLoRA NF4, fp32 compute": ("fp32", "nf4", 0, 2.4, 600, 500, 1.53),
    "QLoRA NF4, bf16 compute": ("bf16", "nf4", 0, 1.2, 800, 600, 1.55),
}


def runs() -> pd.DataFrame:
    rows = []
    for cfg, (precision, base, ckpt, step, peak, pred, held) in CONFIGS.items():
        cols = dict(config=cfg, precision=precision, quantize_base=base, checkpointing=ckpt)
        rows += [
            row("step_s", step, **cols),
            row("peak_bytes", peak * 1e6, **cols),
            row("predicted_total_bytes", pred * 1e6, **cols),
            row("eval_loss", held + 0.3, step=8, **cols),
            row("eval_loss", held, step=16, **cols),
        ]
    return pd.DataFrame(rows)


def test_each_qlora_configuration_is_set_against_lora_in_the_same_precision():
    table = tables.qlora_table(runs())
    assert table.loc["QLoRA NF4, bf16 compute", "step_time_vs_lora"] == 1.2
    assert table.loc["QLoRA NF4, fp32 compute", "held_out_loss"] == 1.53  # the last evaluation
    assert math.isclose(table.loc["QLoRA NF4, fp32 compute", "held_out_vs_lora"], 1.53 / 1.50)
    assert table["step_time_vs_lora"].isna()[["LoRA fp32", "LoRA bf16"]].all()
    text = findings.qlora(table, runs())
    assert "**QLoRA NF4, bf16 compute** against LoRA bf16: step time **x1.20**" in text
    assert "the ledger predicts 400 MB saved" in text
    assert "the measured peak fell 400 MB (**100%** of it" in text


def test_the_storage_table_sums_every_kind_and_the_qat_prose_reads_the_gap():
    storage = pd.DataFrame(
        [
            row("weights_bytes", 4e6, format="fp32", kind="q_proj"),
            row("weights_bytes", 0.5e6, format="nf4", kind="q_proj"),
        ]
        + [row("relative_error", 0.1, format="nf4", kind="q_proj")]
        + [
            row("weights_bytes", 8e6, format="fp32", kind="up_proj"),
            row("weights_bytes", 1e6, format="nf4", kind="up_proj"),
        ]
        + [row("relative_error", 0.2, format="nf4", kind="up_proj")]
    )
    table = tables.storage_table(storage)
    assert table.loc["all", "nf4 / fp32"] == 0.125 and table.loc["all", "fp32 (MB)"] == 12
    assert "**0.1250x**" in findings.nf4_storage(table) and "within the 0.13x target" in findings.nf4_storage(
        table
    )
    ppl = {"LoRA fp32": 6.0, "LoRA, then int4 g64 (PTQ)": 8.0, "QAT int4 g64": 7.0}
    qat = pd.DataFrame(
        [row("perplexity", v, model=m, arithmetic="fp32") for m, v in ppl.items()]
        + [row("gap_recovered", 0.5, group_size=64, arithmetic="fp32")]
    )
    text = findings.qat(tables.qat_table(qat), qat)
    assert "6.000 in fp32 after LoRA, 8.000 quantized after training, 7.000 with QAT" in text
    assert "QAT recovers **50%** of the gap" in text


def test_the_headline_reads_the_qlora_runs_and_the_qat_gap(tmp_path):
    results.save(runs(), tmp_path, "08_qlora", "runs")
    results.save([row("gap_recovered", 0.4, group_size=64, arithmetic="fp32")], tmp_path, "08_qlora", "qat")
    text = headlines.qlora(tmp_path)
    assert "QLoRA NF4, bf16 compute against LoRA bf16: peak 1,200 to 800 MB (**x0.67**), step x1.20" in text
    assert "QAT recovers **40%** of the int4 g64 post-training gap" in text


def test_the_base_loss_prose_gives_the_gap_the_adapters_start_from():
    rows = pd.DataFrame([row("eval_loss", 2.0, base="full precision"), row("eval_loss", 2.2, base="nf4")])
    assert "**2.000** with the full-precision base and **2.200** with the NF4 base (**+10.0%**)" in (
        findings.base_loss(rows)
    )


def test_a_4bit_run_is_paired_with_the_lora_run_of_the_same_precision_and_adapters():
    rows = runs()
    rows["lora_targets"] = "q_proj,v_proj"
    every = dict(precision="bf16", checkpointing=0, lora_targets="all-linear")
    extra = [
        row("step_s", 3.0, config="LoRA bf16, all linears", quantize_base=None, **every),
        row("step_s", 2.7, config="QLoRA NF4, bf16, all linears", quantize_base="nf4", **every),
    ]
    twins = tables.lora_twins(pd.concat([rows, pd.DataFrame(extra)]))
    assert twins["QLoRA NF4, bf16, all linears"] == "LoRA bf16, all linears"
    assert twins["QLoRA NF4, bf16 compute"] == "LoRA bf16"
