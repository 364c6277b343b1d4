"""The report runner, profiles and HTML rendering, exercised on tiny fixture notebooks."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from effllm.report import cli, profiles, runner

FIXTURES = Path(__file__).parents[1] / "fixtures"
SECRET = "hf_secret_test_value"


def run_cli(*args: str) -> tuple[int, str]:
    """Run `effllm report` on the fixtures; return the exit status and everything printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(["report", "--profile", "smoke", "--notebooks-dir", str(FIXTURES), *args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        code, log = run_cli("--out", str(out), "--set", "01_measure.repeats=3", "--set", "label=hello")
    return code, log, out / "smoke"


def test_the_cpu_profile_is_the_notebooks_own_defaults():
    assert profiles.DEFAULT_PROFILE == "cpu"
    assert {"smoke", "cpu", "gpu"} <= set(profiles.PROFILES)
    assert profiles.PROFILES["cpu"] == {"common": {}}  # the parameters cells are the one source of defaults


@pytest.mark.parametrize("profile", ["smoke", "gpu"])
def test_profiles_override_only_parameters_the_notebooks_declare(profile):
    import ast

    import papermill

    notebooks = {p.stem: p for p in (Path(__file__).parents[2] / "notebooks").glob("*.ipynb")}
    defaults = {
        stem: {k: v["default"] for k, v in papermill.inspect_notebook(str(p)).items()}
        for stem, p in notebooks.items()
    }
    for stem, values in profiles.PROFILES[profile].items():
        names = set().union(*defaults.values()) if stem == "common" else set(defaults[stem])
        assert set(values) <= names, f"{profile}.{stem} sets undeclared {set(values) - names}"
        if stem != "common":
            same = {k for k, v in values.items() if ast.literal_eval(defaults[stem][k]) == v}
            assert not same, f"{profile}.{stem} repeats the notebook's defaults {same}"


def test_profile_merging_order_is_common_notebook_global_then_targeted():
    overrides = profiles.parse_overrides(["repeats=7", "01_kv_cache.prompt_len=5", "02_lora.lr=0.1"])
    params = profiles.merged("smoke", "01_kv_cache", overrides)
    assert params["model"] == "tiny" and params["repeats"] == 7 and params["prompt_len"] == 5
    assert "lr" not in params
    assert profiles.merged("smoke", "02_lora", overrides)["lr"] == 0.1


def test_merged_parameters_are_copies():
    profiles.merged("smoke", "01_kv_cache")["batch_sizes"].append(99)
    assert 99 not in profiles.PROFILES["smoke"]["01_kv_cache"]["batch_sizes"]


def test_for_notebook_keeps_only_declared_names():
    assert profiles.for_notebook("smoke", "01_kv_cache", {"repeats", "seed"}) == {"repeats": 1}


def test_parse_overrides_reads_literals_and_targets():
    got = profiles.parse_overrides(["a=5", "b=[1, 2]", "c=true", "d=none-such", "e=None", "01_x.f='s'"])
    assert got == {"*": {"a": 5, "b": [1, 2], "c": True, "d": "none-such", "e": None}, "01_x": {"f": "s"}}


@pytest.mark.parametrize("bad", ["repeats", "=3", "01_x.=3", "a-b=1"])
def test_parse_overrides_rejects_malformed_items(bad):
    with pytest.raises(ValueError, match="--set"):
        profiles.parse_overrides([bad])


DECLARED = {
    "01_a": {"repeats": {"inferred_type_name": "int"}, "label": {"inferred_type_name": "str"}},
    "02_b": {"sizes": {"inferred_type_name": "list"}, "model": {"inferred_type_name": "str | None"}},
}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["nosuch=1"], "--set nosuch: no such parameter; valid names: label, model, repeats, sizes"),
        (["01_a.sizes=[1]"], "--set 01_a.sizes: no such parameter; valid names: label, repeats"),
        (["09_b.repeats=1"], "notebook '09_b' is not being run"),
        (["repeats=abc"], "--set repeats='abc': expected int, got str"),
        (["02_b.sizes=[1,2"], "expected list, got str"),
        (["repeats=True"], "expected int, got bool"),
    ],
)
def test_a_bad_override_is_an_error_that_lists_the_valid_names(sets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        profiles.check_overrides(profiles.parse_overrides(sets), DECLARED)


def test_good_overrides_pass():
    sets = ["repeats=3", "label=hi", "02_b.sizes=[1, 2]", "model=None", "02_b.model=x"]
    profiles.check_overrides(profiles.parse_overrides(sets), DECLARED)


def test_gpu_profile_without_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="pass --model PATH_OR_HUB_ID"):
        profiles.check_profile("gpu")
    profiles.check_profile("gpu", {"*": {"model": "/models/llama"}})
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "--profile", "gpu", "--notebooks-dir", str(FIXTURES), "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err


def test_discover_puts_summary_last_and_names_unknown_notebooks(tmp_path):
    for name in ("00_summary", "02_b", "01_a", ".hidden"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    assert [p.stem for p in runner.discover(tmp_path)] == ["01_a", "02_b", "00_summary"]
    with pytest.raises(ValueError, match="no notebook 03_c in .*available: 00_summary, 01_a, 02_b"):
        runner.discover(tmp_path, ["03_c"])


def test_cli_modules_import_nothing_heavy():
    code = (
        "import sys, effllm; before = set(sys.modules); "
        "import effllm.report.cli, effllm.report.runner, effllm.report.profiles, effllm.report.html; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new & {'torch', 'papermill', 'nbconvert'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_failing_notebook_does_not_stop_the_others(first_run):
    code, log, run_dir = first_run
    assert code == 1
    record = json.loads((run_dir / "run.json").read_text())
    statuses = {stem: e["status"] for stem, e in record["notebooks"].items()}
    assert statuses == {"01_measure": "ok", "02_fails": "failed", "03_summary": "ok"}
    assert record["notebooks"]["02_fails"]["error"]["evalue"] == "fixture failure: boom"
    assert record["profile"] == "smoke" and "hardware" in record["provenance"]
    assert {p.name for p in (run_dir / "notebooks").iterdir()} == {f"{s}.ipynb" for s in statuses}
    assert "fixture failure: boom" in (run_dir / "notebooks" / "02_fails.ipynb").read_text()


def test_runner_passes_only_declared_parameters_and_overrides(first_run):
    _, log, run_dir = first_run
    params = {
        s: e["parameters"] for s, e in json.loads((run_dir / "run.json").read_text())["notebooks"].items()
    }
    assert params["01_measure"] == {"repeats": 3, "label": "hello", "run_dir": str(run_dir)}
    assert params["02_fails"] == {"run_dir": str(run_dir)}  # outside the checkout: absolute
    assert "[1/3] 01_measure" in log and "[3/3] 03_summary" in log and "3/3 [" in log  # progress and tqdm


def test_notebooks_write_results_figures_and_meta(first_run):
    _, log, run_dir = first_run
    df = pd.read_csv(run_dir / "results" / "01_measure" / "latency.csv")
    assert len(df) == 4 and set(df["label"]) == {"hello"} and list(df["status"]) == ["ok"] * 3 + ["oom"]
    assert (run_dir / "figures" / "01_measure" / "latency.png").exists()
    assert (
        "02_fails failed (ValueError: fixture failure: boom)" in log
    )  # the summary explains what is missing


def test_html_report_is_self_contained_with_toc_toggle_and_failure(first_run):
    _, _, run_dir = first_run
    html = (run_dir / "report.html").read_text()
    assert 'class="dataframe"' in html and "data:image/png;base64," in html
    assert 'id="effllm-toc"' in html and 'href="#nb-01_measure-1"' in html and 'id="nb-01_measure-1"' in html
    assert 'id="effllm-toggle"' in html and "effllm-hide-code" in html
    assert 'class="effllm-failure"' in html and "fixture failure: boom" in html
    assert "<script src=" not in html and 'src="http' not in html and "<link" not in html
    assert "sha256 of the weights" in html and "abc123" in html  # notebook meta.json merged into provenance


def test_html_reads_findings_first_and_provenance_last(first_run):
    html = (first_run[2] / "report.html").read_text()
    where = {
        k: html.index(f'id="{k}"') for k in ("effllm-toc", "effllm-findings", "nb-01_measure", "nb-02_fails")
    }
    assert where["effllm-toc"] < where["effllm-findings"] < where["nb-01_measure"] < where["nb-02_fails"]
    assert html.index('id="effllm-provenance"') > where["nb-02_fails"]
    assert "<h2>Hardware</h2>" in html and "<h2>Software</h2>" in html and "<h2>Run</h2>" in html


def test_stderr_goes_to_a_linked_log_and_paths_are_relative(first_run):
    _, log, run_dir = first_run
    html = (run_dir / "report.html").read_text()
    assert "fixture chatter on stderr" in log  # the terminal keeps what the kernel wrote to stderr
    assert "fixture chatter" in (run_dir / "logs" / "01_measure.log").read_text()
    assert "UserWarning: fixture chatter" not in html and 'href="logs/01_measure.log"' in html
    assert "application/vnd.jupyter.stderr" in html  # the failing cell's traceback is still shown
    root = str(Path(__file__).resolve().parents[2])
    for path in (run_dir / "report.html", run_dir / "logs" / "01_measure.log"):
        assert root not in path.read_text(), path


def test_no_environment_values_leak_into_outputs(first_run):
    _, _, run_dir = first_run
    assert os.environ.get("HF_TOKEN") != SECRET
    for path in run_dir.rglob("*"):
        if path.suffix in {".html", ".json", ".ipynb", ".csv"}:
            assert SECRET not in path.read_text(), path


def test_only_failed_reruns_the_failed_notebook_and_the_summary(first_run, tmp_path):
    _, _, run_dir = first_run
    shutil.copytree(run_dir, tmp_path / "smoke")
    before = json.loads((tmp_path / "smoke" / "run.json").read_text())["notebooks"]
    code, log = run_cli("--out", str(tmp_path), "--only-failed", "--set", "02_fails.fail=False")
    after = json.loads((tmp_path / "smoke" / "run.json").read_text())["notebooks"]
    assert code == 0 and "[1/2] 02_fails" in log and "[2/2] 03_summary" in log
    assert after["02_fails"]["status"] == "ok" and after["02_fails"]["parameters"]["fail"] is False
    assert after["01_measure"] == before["01_measure"]
    html = (tmp_path / "smoke" / "report.html").read_text()
    assert 'class="effllm-failure"' not in html and 'id="nb-01_measure"' in html


def test_sigint_mid_notebook_leaves_it_interrupted_and_only_failed_reruns_it(tmp_path):
    run_json = tmp_path / "smoke" / "run.json"
    status = lambda stem: json.loads(run_json.read_text())["notebooks"].get(stem, {}).get("status")
    args = ["report", "--profile", "smoke", "--notebooks-dir", str(FIXTURES), "--out", str(tmp_path)]
    sets = ["--set", "02_fails.fail=False", "--set", "02_fails.sleep_s=60"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "effllm.report.cli", *args, *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # An ignored SIGINT is inherited: under the full suite the child must get Python's default handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    sleeping = tmp_path / "smoke" / "02_fails.sleeping"  # the fixture's marker: it is in its sleep now
    while not sleeping.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.2)
    time.sleep(1)
    assert status("02_fails") == "running"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert status("01_measure") == "ok" and status("02_fails") == "interrupted"
    assert not list((tmp_path / "smoke" / "results" / "02_fails").glob("*.csv"))
    code, log = run_cli("--out", str(tmp_path), "--only-failed", "--set", "02_fails.fail=False")
    assert code == 0 and "[1/2] 02_fails" in log and "[2/2] 03_summary" in log, log
    assert (
        status("02_fails") == "ok" and (tmp_path / "smoke" / "results" / "02_fails" / "answer.csv").exists()
    )


def test_an_unwritable_out_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        run_cli("--out", str(blocker / "reports"))
    assert exit_.value.code == 2
