"""The tidy-row vocabulary: every metric has a unit, every status is known, a failure is one row."""

import math

import pytest

from effllm.bench.rows import UNITS, result_rows, row


def test_row_puts_params_first_looks_up_the_unit_and_gives_nan_for_a_missing_value():
    r = row("runtime_s", None, status="oom", reason="out of memory", batch=8)
    assert list(r)[:2] == ["batch", "metric"] and r["unit"] == "s"
    assert math.isnan(r["value"]) and r["status"] == "oom" and r["reason"] == "out of memory"


def test_row_rejects_an_unknown_status_and_a_metric_without_a_unit():
    with pytest.raises(ValueError, match="'crashed' is not one of ok, oom"):
        row("runtime_s", 1.0, status="crashed")
    with pytest.raises(ValueError, match="'latency' has no unit"):
        row("latency", 1.0)


def test_a_failed_result_is_one_row_with_its_reason_and_diverged_is_an_error():
    assert result_rows({"status": "oom", "reason": "killed"}, {"batch": 16}, metric="runtime_s") == [
        row("runtime_s", None, status="oom", reason="killed", batch=16)
    ]
    (bad,) = result_rows({"status": "diverged", "reason": "nan"}, {}, metric="step_s")
    assert bad["status"] == "error"
    ok = result_rows({"status": "ok", "step_s": 1.5, "not_a_metric": 3}, {"stack": "ours"}, metric="step_s")
    assert [(r["metric"], r["value"], r["stack"]) for r in ok] == [("step_s", 1.5, "ours")]


def test_every_status_but_ok_keeps_its_own_name_in_a_failed_row():
    for status in ("oom", "unsupported", "error", "skipped"):
        (r,) = result_rows({"status": status, "reason": "why"}, {"batch": 2}, metric="step_s")
        assert (r["status"], r["reason"], r["batch"], r["metric"]) == (status, "why", 2, "step_s")
        assert math.isnan(r["value"])


def test_peak_window_metrics_have_byte_units():
    assert {UNITS[m] for m in ("baseline_rss_bytes", "peak_rss_bytes", "added_rss_bytes")} == {"B"}
