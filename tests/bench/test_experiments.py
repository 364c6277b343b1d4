import pandas as pd
import pytest

from effllm.bench import experiments
from effllm.report.tables import curves

BASE = experiments.Run(model="tiny", data_dir="data", train_examples=8, max_len=384, micro_batch=2, steps=3)


def test_a_run_gives_loss_curve_timing_and_predicted_beside_measured_memory():
    rows = experiments.measure_run("base", BASE.but(eval_examples=4, eval_every=2))
    df = pd.DataFrame(rows)
    assert set(df["status"]) == {"ok"} and set(df["config"]) == {"base"}
    assert list(curves(df)["step"]) == [1, 2, 3]
    assert len(curves(df, "eval_loss")) == 2
    assert not df["metric"].str.contains("@").any()  # the step is a column, not part of a metric's name
    values = df[df["step"].isna()].set_index("metric")["value"]
    assert values["step_s"] > 0 and values["trainable_pct"] == 100.0
    assert values["predicted_total_bytes"] > values["predicted_parameters_bytes"] > 0
    assert values["peak_bytes"] > values["predicted_parameters_bytes"]
    # the ledger predicts the tensors' own peak (measured without the allocator's slack) closely
    assert abs(values["peak_live_bytes"] / values["predicted_total_bytes"] - 1) < 0.2


def test_lora_run_trains_a_small_fraction():
    lora = dict(r=16, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"])
    df = pd.DataFrame(experiments.measure_run("lora", BASE.but(lora=lora, checkpointing=1)))
    values = df[df["step"].isna()].set_index("metric")["value"]
    assert 0 < values["trainable_pct"] < 20 and df["lora"].all() and set(df["lora_r"]) == {16}


def test_a_configuration_that_cannot_run_is_a_row_with_its_reason():
    rows = experiments.measure_run("too short", BASE.but(max_len=16))
    assert rows[-1]["status"] == "error" and "raise it" in rows[-1]["reason"]


def test_a_sweep_labels_each_configuration_and_keeps_the_stack_order():
    configs = experiments.stack_configs("bf16", {"r": 4}, labels=["a", "b", "c", "d"])
    assert list(configs) == ["a", "b", "c", "d"] and configs["d"]["lora"] == {"r": 4}
    assert configs["c"] == {"precision": "bf16", "checkpointing": 1}


def test_a_run_takes_fields_and_switches_from_notebook_parameters():
    params = dict(
        model="tiny",
        data_dir="data",
        train_examples=4,
        max_len=64,
        micro_batch=2,
        steps=3,
        lr=0.1,
        optimizer="adamw",
        checkpointing=[0, 1],
        unrelated="x",
    )
    run = experiments.Run.from_parameters(params, switches=("lr", "optimizer"), device="cpu")
    assert run.switches == {"lr": 0.1, "optimizer": "adamw"} and run.micro_batch == 2
    assert run.switch("precision") == "fp32"  # train()'s own default
    assert run.but(precision="bf16", max_len=32).columns()["precision"] == "bf16"
    assert run.but(max_len=32).max_len == 32 and run.but(lr=None).switch("lr") == 1e-5
    with pytest.raises(ValueError, match="not train"):
        run.but(steps_per_epoch=3)
