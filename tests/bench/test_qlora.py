"""The 4-bit fine-tuning measurements on the tiny model: NF4 storage, dequantization cost, QAT against
post-training int4 (run in this process)."""

import math

import pandas as pd

from effllm.bench import qlora
from effllm.bench.experiments import Run
from effllm.quantization import dequantize_int4, quantize_int4

LORA = dict(r=4, alpha=8, dropout=0.0, targets="all-linear")


def run(**changes) -> Run:
    fields = dict(model="tiny", data_dir="data", train_examples=4, max_len=512, micro_batch=2, steps=2)
    return Run(**fields, eval_examples=2, switches=dict(lora=LORA, optimizer="adamw", lr=1e-2), **changes)


def test_storage_rows_count_every_block_linear_at_under_013x(tiny):
    rows = pd.DataFrame(qlora.storage_rows(tiny))
    size = rows[rows.metric == "weights_bytes"].groupby("format").value.sum()
    assert size["fp32"] == sum(p.numel() * 4 for n, p in tiny.named_parameters() if "proj" in n)
    assert size["nf4"] <= 0.13 * size["fp32"]
    assert (rows[rows.metric == "relative_error"].value.between(0.01, 0.2)).all()


def test_dequantize_rows_time_each_kind_in_each_dtype(tiny):
    rows = pd.DataFrame(qlora.dequantize_rows(tiny, tokens=8, repeats=1))
    assert len(rows) == 7 * 2 * 2 and (rows.value > 0).all()


def test_int4_weights_are_the_int4_grid_in_fp32(tiny):
    twin = qlora.int4_weights(tiny, 32)
    w = tiny.layers[0].mlp.up_proj.weight.detach()
    assert (twin.layers[0].mlp.up_proj.weight == dequantize_int4(*quantize_int4(w, 32), 32)).all()
    assert not (twin.layers[0].mlp.up_proj.weight == w).all()  # the original is untouched


def test_qat_measures_fp32_ptq_and_qat_perplexities_and_the_gap():
    out = qlora.qat(run=__import__("dataclasses").asdict(run()), group_sizes=[32])
    names = {"fp32 before fine-tuning", "LoRA fp32", "LoRA, then int4 g32 (PTQ)", "QAT int4 g32"}
    assert set(out["fp32"]) == names and set(out["bf16"]) == names - {"fp32 before fine-tuning"}
    assert all(math.isfinite(v) and v > 1 for v in out["fp32"].values())
    assert len(out["curves"]["QAT int4 g32"]) == 2 and not out["failed"]
