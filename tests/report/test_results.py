"""Tidy results on disk: one validated section per file, atomic writes and helpful errors on load."""

import json
import os

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from effllm.bench.rows import row
from effllm.files import atomic_write_text
from effllm.report import results


def test_save_fills_status_and_reason_and_round_trips(tmp_path):
    df = pd.DataFrame(
        {"batch": [1, 2], "metric": ["tokens_per_s"] * 2, "value": [10, 20], "unit": ["tokens/s"] * 2}
    )
    results.save(df, tmp_path, "01_kv_cache", "table")
    assert (tmp_path / "01_kv_cache" / "table.csv").exists()
    back = results.load(tmp_path, "01_kv_cache", "table")
    assert list(back.columns) == ["batch", "metric", "value", "unit", "status", "reason"]
    assert list(back["status"]) == ["ok", "ok"] and list(back["reason"]) == ["", ""]
    assert back["value"].dtype == float
    assert results.sections(tmp_path, "01_kv_cache") == ["table"]


def test_save_rejects_rows_without_a_unit_an_unknown_status_or_a_bad_name(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        results.save([{"metric": "runtime_s", "value": 2.0}], tmp_path, "01_kv_cache", "table")
    bad = [row("runtime_s", 1.0), {"metric": "m", "value": 1.0, "unit": "ms", "status": "bad"}]
    with pytest.raises(ValueError, match="status \\['bad'\\]"):
        results.save(bad, tmp_path, "01_kv_cache", "table")
    with pytest.raises(ValueError, match="section name '../x'"):
        results.save([row("runtime_s", 1.0)], tmp_path, "01_kv_cache", "../x")
    with pytest.raises(ValueError, match="no rows"):
        results.save([], tmp_path, "01_kv_cache", "table")
    assert not list(tmp_path.rglob("*.csv"))


def test_save_overwrites_and_leaves_no_temp_files(tmp_path):
    results.save([row("runtime_s", 1.0)], tmp_path, "x", "s")
    results.save([row("runtime_s", 2.0)], tmp_path, "x", "s")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["s.csv"]
    assert results.load(tmp_path, "x", "s")["value"].tolist() == [2.0]


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    results.save([row("runtime_s", 1.0)], tmp_path, "x", "s")
    old = (tmp_path / "x" / "s.csv").read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        results.save([row("runtime_s", 2.0)], tmp_path, "x", "s")
    assert (tmp_path / "x" / "s.csv").read_text() == old
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["s.csv"]


def test_load_of_a_missing_section_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"02_lora/stack missing: notebook 02_lora has not been run"):
        results.load(tmp_path / "results", "02_lora", "stack")
    record = {
        "notebooks": {"02_lora": {"status": "failed", "error": {"ename": "RuntimeError", "evalue": "OOM"}}}
    }
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match=r"02_lora failed \(RuntimeError: OOM\)"):
        results.load(tmp_path / "results", "02_lora", "stack")
    assert results.try_load(tmp_path / "results", "02_lora", "stack")[0] is None


def test_save_figure_writes_a_png_and_meta_is_json(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    path = results.save_figure(fig, "curve", tmp_path / "figures")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = results.save_meta(tmp_path, "01_kv_cache", {"model": {"sha256": "abc"}})
    assert json.loads(meta.read_text()) == {"model": {"sha256": "abc"}}


def test_atomic_write_text_creates_parent_folders(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.json", '{"x": 1}')
    assert json.loads(path.read_text()) == {"x": 1}
