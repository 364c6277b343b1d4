"""Tables as a reader sees them: headers in words with units, numbers formatted per column."""

import math

import pandas as pd
import pytest

from effllm.report import display, paths


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("peak_memory_gb", "Peak memory (GB)"),
        ("speedup_vs_transformers", "ours / transformers (tokens/s)"),
        ("predicted_activations_mb", "Predicted activations (MB)"),
        ("micro_step_s", "Time per micro-step (s)"),
        ("some_new_bytes", "Some new (bytes)"),
        ("measured peak (MB)", "measured peak (MB)"),  # already words
        (3, 3),
    ],
)
def test_headers_are_words_with_units(name, header):
    assert display.label(name) == header


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (100.0, "100"),
        (1234567.0, "1,234,567"),
        (12.3456, "12.3"),
        (1.23456, "1.23"),
        (0.0123456, "0.0123"),
        (1.5e-7, "1.50e-07"),
        (0.0, "0"),
        (-2.5, "-2.50"),
        (math.nan, "—"),
        (True, "yes"),
        ("fp32", "fp32"),
    ],
)
def test_numbers_read_to_three_significant_digits(value, text):
    assert display.number(value) == text


def test_a_table_renders_booleans_not_applicable_and_headers_without_touching_the_frame():
    df = pd.DataFrame(
        {"tokens_identical": [1.0, 0.0], "delta_runtime_s": [math.nan, 2.5]},
        index=pd.Index(["on", "off"], name="cache"),
    )
    html = display.html(df)
    assert ">yes<" in html and ">no<" in html and ">—<" in html and ">2.50<" in html
    assert "Tokens identical" in html and "Extra runtime without the cache (s)" in html and "KV cache" in html
    assert "tokens_identical" not in html and "1.000" not in html
    assert list(df.columns) == ["tokens_identical", "delta_runtime_s"] and df.index.name == "cache"


def test_an_empty_table_is_a_note_not_a_bare_header():
    html = display.html(pd.DataFrame(columns=["config", "status", "reason"]))
    assert "<table" not in html and "No rows" in html


def test_column_levels_are_labelled_too():
    df = pd.concat({"this run": pd.DataFrame({"runtime_s": [1.0]})}, axis=1)
    html = display.html(df)
    assert "This run" in html and "Runtime (s)" in html


def test_paths_are_shown_relative_to_the_checkout_or_home():
    assert paths.shown(paths.ROOT / "reports" / "cpu") == "reports/cpu"
    assert paths.shown(paths.HOME / "models" / "x.gguf") == "~/models/x.gguf"
    text = f"File {paths.ROOT}/effllm/model.py, line 3; cache {paths.HOME}/.cache; {paths.ROOT} ends"
    assert paths.scrub(text) == "File effllm/model.py, line 3; cache ~/.cache; . ends"
    assert paths.for_run(paths.ROOT / "reports" / "x") == "reports/x"
