"""Tidy results: rows, validation, atomic writes and helpful errors on load."""

import json
import math
import os

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from effllm import results


def test_row_puts_params_first_and_nan_for_missing_value():
    r = results.row("latency", None, "ms", status="oom", reason="out of memory", batch=8)
    assert list(r)[:2] == ["batch", "metric"]
    assert math.isnan(r["value"]) and r["status"] == "oom" and r["reason"] == "out of memory"


def test_row_rejects_unknown_status():
    with pytest.raises(ValueError, match="'crashed' is not one of ok, oom"):
        results.row("latency", 1.0, "ms", status="crashed")


def test_save_fills_status_and_reason_and_round_trips(tmp_path):
    df = pd.DataFrame({"batch": [1, 2], "metric": ["tok/s"] * 2, "value": [10, 20], "unit": ["tok/s"] * 2})
    path = results.save(df, "01_kv_cache", tmp_path)
    assert path == tmp_path / "01_kv_cache.csv"
    back = results.load("01_kv_cache", tmp_path)
    assert list(back.columns) == ["batch", "metric", "value", "unit", "status", "reason"]
    assert list(back["status"]) == ["ok", "ok"] and list(back["reason"]) == ["", ""]
    assert back["value"].dtype == float


def test_save_names_the_row_that_lacks_a_column(tmp_path):
    rows = [results.row("latency", 1.0, "ms"), {"metric": "latency", "value": 2.0}]
    with pytest.raises(ValueError, match="row 1 has no unit"):
        results.save(rows, "01_kv_cache", tmp_path)
    assert not list(tmp_path.iterdir())


def test_save_names_a_row_with_unknown_status(tmp_path):
    rows = [results.row("latency", 1.0, "ms"), {"metric": "m", "value": 1.0, "unit": "ms", "status": "bad"}]
    with pytest.raises(ValueError, match="row 1: status 'bad'"):
        results.save(rows, "01_kv_cache", tmp_path)


def test_save_overwrites_and_leaves_no_temp_files(tmp_path):
    results.save([results.row("latency", 1.0, "ms")], "x", tmp_path)
    results.save([results.row("latency", 2.0, "ms")], "x", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]
    assert results.load("x", tmp_path)["value"].tolist() == [2.0]


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    results.save([results.row("latency", 1.0, "ms")], "x", tmp_path)
    old = (tmp_path / "x.csv").read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        results.save([results.row("latency", 2.0, "ms")], "x", tmp_path)
    assert (tmp_path / "x.csv").read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["x.csv"]


def test_load_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"02_lora\.csv does not exist because notebook 02_lora has not"
    ):
        results.load("02_lora", tmp_path / "results")


def test_load_of_a_missing_file_says_the_notebook_failed(tmp_path):
    record = {
        "notebooks": {"02_lora": {"status": "failed", "error": {"ename": "RuntimeError", "evalue": "OOM"}}}
    }
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match=r"02_lora failed \(RuntimeError: OOM\)"):
        results.load("02_lora", tmp_path / "results")


def test_save_figure_writes_a_png(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    path = results.save_figure(fig, "curve", tmp_path / "figures")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_atomic_write_text_creates_parent_folders(tmp_path):
    path = results.atomic_write_text(tmp_path / "a" / "b.json", '{"x": 1}')
    assert json.loads(path.read_text()) == {"x": 1}
