"""Run the report notebooks headlessly with papermill and record each outcome in run.json.

Layout of a run, `<out>/<run>/`: notebooks/ (executed copies), results/<stem>/ (a tidy CSV per section
and meta.json, written by the notebooks), figures/<stem>/, run.json and report.html. A failing notebook
is recorded and the next one runs; `html.render` then shows the failure in the report.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

from effllm.report import profiles, provenance
from effllm.report.paths import NOTEBOOKS_DIR, ROOT, for_run
from effllm.report.record import order, read_run_json, write_run_json

KERNEL = "python3"


def discover(notebooks_dir: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """The notebooks to run in report order: by name, with `*summary` notebooks last."""
    notebooks_dir = Path(notebooks_dir).resolve()
    found = {p.stem: p for p in notebooks_dir.glob("*.ipynb") if not p.name.startswith((".", "_"))}
    if names:
        wanted = [n.removesuffix(".ipynb") for n in names]
        unknown = [n for n in wanted if n not in found]
        if unknown:
            raise ValueError(
                f"no notebook {', '.join(unknown)} in {notebooks_dir}; available: {', '.join(sorted(found))}"
            )
        found = {n: found[n] for n in wanted}
    if not found:
        raise ValueError(f"no notebooks (*.ipynb) found in {notebooks_dir}")
    return [found[s] for s in sorted(found, key=order)]


def run_report(
    *,
    profile: str = profiles.DEFAULT_PROFILE,
    run: str | None = None,
    notebooks: Sequence[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    only_failed: bool = False,
    out: str | Path = "reports",
    html: bool = True,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
) -> int:
    """Execute the notebooks into `<out>/<run>/`, write run.json and report.html; 1 if any notebook failed."""
    import papermill

    overrides = overrides or {}
    profiles.check_profile(profile, overrides)
    _check_kernel()
    run_dir = Path(out).resolve() / (run or profile)
    record = read_run_json(run_dir)
    paths = discover(notebooks_dir, notebooks)
    if only_failed:
        again = [p for p in paths if record["notebooks"].get(p.stem, {}).get("status") != "ok"]
        # the summary reads the others' results, so it is re-run whenever anything else is
        paths = [p for p in paths if p in again or (again and p.stem.endswith("summary"))]
    declared = {p.stem: papermill.inspect_notebook(str(p)) for p in paths}
    if paths:
        profiles.check_overrides(overrides, declared)
    record.update(run=run_dir.name, profile=profile, provenance=provenance.collect())
    failed = 0
    start = time.perf_counter()
    for i, path in enumerate(paths, 1):
        params = profiles.for_notebook(profile, path.stem, declared[path.stem], overrides)
        params.update(_path_parameters(run_dir, declared[path.stem]))
        _say(f"[{i}/{len(paths)}] {path.stem}: started at +{_clock(time.perf_counter() - start)}")
        # "running" until it ends: a run killed now leaves it not "ok", so --only-failed re-runs it
        record["notebooks"][path.stem] = _entry("running", params, profile)
        write_run_json(run_dir, record)
        try:
            entry = _execute(path, run_dir, params, profile)
        except KeyboardInterrupt:
            error = {"ename": "KeyboardInterrupt", "evalue": "interrupted (SIGINT) before it finished"}
            record["notebooks"][path.stem] = {**record["notebooks"][path.stem], "status": "interrupted"}
            record["notebooks"][path.stem]["error"] = {**error, "cell": None}
            write_run_json(run_dir, record)
            raise
        record["notebooks"][path.stem] = entry
        write_run_json(run_dir, record)
        outcome = "ok" if entry["error"] is None else f"FAILED: {_one_line(entry['error'])}"
        _say(f"[{i}/{len(paths)}] {path.stem}: {outcome} in {entry['wall_s']:.1f} s")
        failed += entry["error"] is not None
    write_run_json(run_dir, record)
    if html:
        from effllm.report.html import render

        _say(f"report: {render(run_dir)}")
    done = f"{len(paths) - failed} of {len(paths)} notebooks ok" if paths else "nothing to re-run"
    _say(f"{done} in {_clock(time.perf_counter() - start)}")
    return 1 if failed else 0


def _execute(path: Path, run_dir: Path, params: dict[str, Any], profile: str) -> dict[str, Any]:
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    executed = run_dir / "notebooks" / path.name
    _clear_outputs(run_dir, path.stem, executed)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    error = None
    # the kernel gets the repository on its path, so notebooks import effllm even without `pip install -e`
    kernel_env = {"PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    try:
        with patch.dict(os.environ, kernel_env):
            papermill.execute_notebook(
                str(path),
                str(executed),
                parameters=params,
                kernel_name=KERNEL,
                cwd=str(path.parent),
                progress_bar=False,
                stdout_file=sys.stdout,
                stderr_file=sys.stderr,
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],  # no kernel transport warnings
            )
    except PapermillExecutionError as e:
        error = {"ename": e.ename, "evalue": e.evalue, "cell": e.exec_count}
    except Exception as e:  # a dead kernel or a timeout must not stop the other notebooks
        hint = (
            " (the kernel process was killed: often it ran out of memory)"
            if isinstance(e, DeadKernelError)
            else ""
        )
        error = {"ename": type(e).__name__, "evalue": f"{e}{hint}", "cell": None}
    entry = _entry("ok" if error is None else "failed", params, profile, started_utc=started)
    return {**entry, "wall_s": round(time.perf_counter() - t0, 2), "error": error}


def _entry(status: str, params: dict[str, Any], profile: str, started_utc: str | None = None) -> dict:
    """A notebook's record in run.json (wall time and error filled in when it ends)."""
    started = started_utc or datetime.now(UTC).isoformat(timespec="seconds")
    return {
        "status": status,
        "wall_s": 0.0,
        "started_utc": started,
        "profile": profile,
        "parameters": params,
        "error": None,
    }


def _path_parameters(run_dir: Path, declared: set[str]) -> dict[str, str]:
    """The run directory, relative to the checkout when inside it (notebooks resolve it from there)."""
    return {"run_dir": for_run(run_dir)} if "run_dir" in declared else {}


def _clear_outputs(run_dir: Path, stem: str, executed: Path) -> None:
    executed.unlink(missing_ok=True)
    for stale in (run_dir / "results" / stem, run_dir / "figures" / stem):
        shutil.rmtree(stale, ignore_errors=True)
    for sub in ("notebooks", f"results/{stem}", f"figures/{stem}"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)


def _check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        fix = f"{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL}"
        raise ValueError(f"no Jupyter kernel named {KERNEL!r}: install it with `{fix}`") from None


def _one_line(error: dict[str, Any]) -> str:
    evalue = (error.get("evalue") or "").strip().splitlines()
    return f"{error['ename']}: {evalue[0] if evalue else ''}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _say(message: str) -> None:
    print(f"effllm: {message}", file=sys.stderr, flush=True)
