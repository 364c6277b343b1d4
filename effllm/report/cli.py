"""The `effllm` command: `effllm report` runs the notebooks of a profile and renders the HTML report.

Kept free of heavy imports (torch, papermill, nbconvert load only once a command runs), so that
`effllm --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from effllm.report import profiles


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `effllm` command."""
    parser = argparse.ArgumentParser(prog="effllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="execute the notebooks and render reports/<run>/report.html")
    rep.add_argument(
        "--profile",
        default=profiles.DEFAULT_PROFILE,
        choices=sorted(profiles.PROFILES),
        help="named parameter set (default: %(default)s)",
    )
    rep.add_argument("--run", help="name of the output folder under --out (default: the profile name)")
    rep.add_argument(
        "--notebooks", nargs="+", metavar="STEM", help="run only these notebooks, e.g. 01_kv_cache"
    )
    rep.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="[NOTEBOOK.]KEY=VALUE",
        help="override a parameter (value parsed as a Python/JSON literal); repeatable",
    )
    rep.add_argument("--model", help="model path or hub id (required by the gpu profile)")
    rep.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1")
    rep.add_argument("--only-failed", action="store_true", help="re-run only notebooks not ok in run.json")
    rep.add_argument("--out", default="reports", help="parent folder of the runs (default: %(default)s)")
    rep.add_argument("--no-html", dest="html", action="store_false", help="skip rendering report.html")
    rep.add_argument(
        "--notebooks-dir", help="folder holding the notebooks (default: the repository's notebooks/)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `effllm` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from effllm.report.paths import NOTEBOOKS_DIR
    from effllm.report.runner import run_report

    try:
        overrides = profiles.parse_overrides(args.sets)
        for key in ("model", "device"):
            if getattr(args, key) is not None:
                overrides.setdefault(profiles.ALL, {})[key] = getattr(args, key)
        return run_report(
            profile=args.profile,
            run=args.run,
            notebooks=args.notebooks,
            overrides=overrides,
            only_failed=args.only_failed,
            out=args.out,
            html=args.html,
            notebooks_dir=args.notebooks_dir or NOTEBOOKS_DIR,
        )
    except ValueError as e:
        parser.exit(2, f"effllm: error: {e}\n")
    except OSError as e:  # e.g. a read-only --out: say which file, not a traceback
        where = f" {e.filename}" if e.filename else ""
        parser.exit(2, f"effllm: error: cannot write{where}: {e.strerror or e}\n")
    except KeyboardInterrupt:
        print("effllm: interrupted; run.json holds the notebooks finished so far", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
