"""The notebooks, executed headlessly under the smoke profile, write their results and the HTML report."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import papermill
import pytest

from effllm.report import headlines

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
RESULT_COLUMNS = {"metric", "value", "unit", "status", "reason"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_source_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), (
        "commit notebooks without outputs"
    )
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    lines = "".join(tagged[0]["source"]).splitlines()
    for line in lines:
        assert re.match(r"^\w+: [\w\[\], |]+ = .+  # .+", line), (
            f"parameter without type hint or comment: {line}"
        )
    declared = set(papermill.inspect_notebook(str(path)))  # papermill must see every parameter
    assert declared == {line.split(":")[0] for line in lines}


def test_smoke_report_runs_every_notebook(smoke_run):
    code, run_dir = smoke_run
    record = json.loads((run_dir / "run.json").read_text())
    failed = {k: v["error"] for k, v in record["notebooks"].items() if v["status"] != "ok"}
    assert code == 0 and not failed, failed
    assert set(record["notebooks"]) == {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize(
    "path", [p for p in NOTEBOOKS if not p.stem.endswith("summary")], ids=lambda p: p.stem
)
def test_each_notebook_writes_tidy_results(smoke_run, path):
    sections = sorted((smoke_run[1] / "results" / path.stem).glob("*.csv"))
    assert sections, f"{path.stem} saved no results"
    for csv in sections:
        df = pd.read_csv(csv)
        assert RESULT_COLUMNS <= set(df.columns) and len(df) > 0, csv
        assert set(df["status"]) <= {"ok", "oom", "unsupported", "error", "skipped"}, csv
        assert not df["metric"].str.contains("@").any(), (
            f"{csv}: dimensions belong in columns, not metric names"
        )


def test_notebook_code_cells_are_short():
    for nb_path in NOTEBOOKS:
        cells = [c for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]
        for cell in cells[1:]:  # after the parameters cell
            lines = [ln for ln in "".join(cell["source"]).splitlines() if ln.strip()]
            assert len(lines) <= 20, f"{nb_path.stem}: a {len(lines)}-line cell; move its logic into effllm"


def test_html_report_holds_the_tables_and_embedded_figures(smoke_run):
    html = (smoke_run[1] / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64" in html
    assert "KV caching" in html and "reference" in html


def test_readme_tables_are_printed_from_a_run(smoke_run):
    script = Path(__file__).parents[2] / "scripts" / "readme_tables.py"
    proc = subprocess.run([sys.executable, str(script), str(smoke_run[1])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| Batch | KV cache | Peak memory (GB) |" in proc.stdout, proc.stdout
    assert "- **KV caching**: " in proc.stdout  # the key findings, without the report's anchors
    assert "| Baseline (FP32) |" in proc.stdout and "| + LoRA |" in proc.stdout
    assert "Wall time" in proc.stdout and "logical cores" in proc.stdout


def test_key_findings_give_every_notebook_a_headline_from_its_results(smoke_run):
    results_dir = smoke_run[1] / "results"
    text = headlines.key_findings(results_dir)
    assert "not measured" not in text, text
    for stem in headlines.HEADLINES:
        assert f"(#nb-{stem})" in text
    assert headlines.not_run(results_dir).startswith("Everything ran")
    html = (smoke_run[1] / "report.html").read_text()
    assert html.index('id="effllm-findings"') < html.index('id="nb-01_kv_cache"')


def test_the_fine_tune_that_learns_saves_its_held_out_curve(smoke_run):
    learn = pd.read_csv(smoke_run[1] / "results" / "02_lora" / "learn.csv")
    evals = learn[learn.metric == "eval_loss"].sort_values("step")
    assert evals.step.iloc[0] == 0 and len(evals) >= 2 and (learn.metric == "loss").any()
