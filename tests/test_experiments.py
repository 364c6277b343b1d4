import pandas as pd

from effllm import experiments

TINY = dict(model="tiny", train_examples=8, max_len=384, micro_batch=2, steps=3)


def test_a_run_gives_loss_curve_timing_and_predicted_beside_measured_memory():
    rows = experiments.run("base", eval_examples=4, eval_every=2, **TINY)
    df = pd.DataFrame(rows)
    assert set(df["status"]) == {"ok"} and set(df["config"]) == {"base"}
    assert list(experiments.curves(rows)["step"]) == [1, 2, 3]
    assert len(experiments.curves(rows, "eval_loss")) == 2
    values = df.set_index("metric")["value"]
    assert values["step_s"] > 0 and values["trainable_pct"] == 100.0
    assert values["predicted_total_bytes"] > values["predicted_parameters_bytes"] > 0
    assert values["peak_bytes"] > values["predicted_parameters_bytes"]
    # the ledger predicts the tensors' own peak (measured without the allocator's slack) closely
    assert abs(values["peak_live_bytes"] / values["predicted_total_bytes"] - 1) < 0.2


def test_lora_run_trains_a_small_fraction():
    df = pd.DataFrame(experiments.run("lora", lora=True, checkpointing=1, **TINY)).set_index("metric")
    assert 0 < df.loc["trainable_pct", "value"] < 20


def test_a_configuration_that_cannot_run_is_a_row_with_its_reason():
    rows = experiments.run("too short", **{**TINY, "max_len": 16})
    assert rows[-1]["status"] == "error" and "raise it" in rows[-1]["reason"]
