"""Render a run (`run.json` + executed notebooks) into one self-contained report.html with nbconvert.

Reading order: the title and contents, then the key findings (the summary notebook, which runs last but
reads first), then each notebook under its own heading (a failed one behind a red box naming its error),
then provenance grouped as hardware, software, model, data and run. Code input is hidden behind a toggle.
What a notebook wrote to stderr (warnings, progress bars, library chatter) is moved to
`logs/<stem>.log`, linked from its heading; a failing cell's error stays in the page. Paths are shown
relative to the checkout or `~`. Images are embedded as base64 data URIs and no script is loaded from the
network (require.js, MathJax and mermaid are left out: TeX shows as source). The page template is
`templates/report.html.j2`, an extension of nbconvert's `lab` template.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import nbformat

from effllm.files import atomic_write_text
from effllm.report import provenance
from effllm.report.paths import scrub
from effllm.report.record import read_run_json

HEADING = re.compile(r"^(#{1,2})\s+(.+?)\s*#*\s*$")
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
TEMPLATES = Path(__file__).parent / "templates"  # report.html.j2, shipped as package data
ELEMENT_ID = re.compile(r'(<[a-zA-Z][^>]*?\sid=")([^"]+)(")')


def render(run_dir: str | Path) -> Path:
    """Merge the executed notebooks of `run_dir` into `run_dir/report.html` and return its path."""
    from jinja2 import FileSystemLoader
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    run_dir = Path(run_dir)
    record = read_run_json(run_dir)
    if not record["notebooks"]:
        raise ValueError(f"{run_dir / 'run.json'} lists no notebooks: run `effllm report` first")
    nb = merge(run_dir, record)
    exporter = HTMLExporter(
        template_name="lab",
        template_file="report.html.j2",
        extra_loaders=[FileSystemLoader(TEMPLATES)],
        embed_images=True,
    )
    exporter.register_preprocessor(CoalesceStreamsPreprocessor(), enabled=True)  # tqdm's \r updates
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": nb.metadata["title"]}})
    return atomic_write_text(run_dir / "report.html", unique_ids(scrub(html)))


def merge(run_dir: Path, record: dict[str, Any]) -> nbformat.NotebookNode:
    """One notebook: title, contents, key findings, every notebook under its own heading, provenance."""
    body, toc, metadata = [], [], {}
    stems = sorted(record["notebooks"], key=lambda s: not s.endswith("summary"))  # findings first
    for stem in stems:
        entry = record["notebooks"][stem]
        path = run_dir / "notebooks" / f"{stem}.ipynb"
        nb = nbformat.read(path, as_version=4) if path.exists() else None
        cells, title, sections = _notebook_cells(nb, stem) if nb else ([], stem, [])
        log = _move_stderr_to_log(cells, run_dir / "logs" / f"{stem}.log")
        metadata = metadata or (nb.metadata if nb else {})
        findings = stem.endswith("summary")
        anchor = "effllm-findings" if findings else f"nb-{stem}"
        toc.append((anchor, title, entry["status"], sections))
        header = _notebook_header(
            stem, title, entry, anchor, saved=nb is not None, anchored=_has_marker(cells), log=log
        )
        body += [_raw(header), *cells]
    title = f"effllm report: {record.get('run', run_dir.name)}"
    head = [f'<h1 id="effllm-top">{escape(title)}</h1>{_subtitle(record)}', _toc(toc)]
    tail = [_provenance(record, provenance.notebook_meta(run_dir / "results"))]
    cells = [_raw(h) for h in head] + body + [_raw(t) for t in tail]
    for i, cell in enumerate(cells):
        cell["id"] = f"c{i}"  # cell ids must be unique across the merged notebooks
    merged = nbformat.v4.new_notebook(cells=cells)
    merged.metadata.update({k: metadata[k] for k in ("kernelspec", "language_info") if k in metadata})
    merged.metadata["title"] = title
    return merged


def unique_ids(html: str) -> str:
    """The page with every repeated element id (the same heading in two notebooks) made unique."""
    counts, seen = Counter(m[2] for m in ELEMENT_ID.finditer(html)), Counter()

    def rename(m: re.Match) -> str:
        seen[m[2]] += 1
        if counts[m[2]] == 1 or seen[m[2]] == 1:
            return m[0]
        return f"{m[1]}{m[2]}-{seen[m[2]]}{m[3]}"

    return ELEMENT_ID.sub(rename, html)


def _notebook_cells(nb: nbformat.NotebookNode, stem: str) -> tuple[list, str, list[tuple[str, str]]]:
    """The notebook's cells with its `#` title taken out, `##` headings anchored and the failure marked."""
    title, sections, cells = None, [], []
    for cell in nb.cells:
        if PAPERMILL_ERROR_TAG in cell.metadata.get("tags", []):
            continue  # papermill's own markers use one fixed id; the failure box replaces them
        if cell.cell_type == "markdown":
            lines, fence = [], False
            for line in cell.source.splitlines():
                fence ^= line.lstrip().startswith(("```", "~~~"))
                m = None if fence else HEADING.match(line)
                if m and len(m[1]) == 1 and title is None:
                    title = m[2]
                    continue
                if m and len(m[1]) == 2:
                    sections.append((f"nb-{stem}-{len(sections) + 1}", m[2]))
                    line = f'## <a id="{sections[-1][0]}"></a>{m[2]}'
                lines.append(line)
            cell.source = "\n".join(lines)
        errors = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
        if (errors or cell.metadata.get("papermill", {}).get("exception")) and not _has_marker(cells):
            cells.append(
                _raw(f'<div class="effllm-failure" id="nb-{stem}-error">Stopped here:</div>', "error-here")
            )
        cells.append(cell)
    return cells, title or stem, sections


def _move_stderr_to_log(cells: list, log: Path) -> Path | None:
    """Take every stderr stream out of the cells into `log` (written atomically); None if there was none."""
    text = []
    for cell in cells:
        outputs = cell.get("outputs", [])
        kept = [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        if len(kept) < len(outputs):
            label = f"--- cell In [{cell.get('execution_count')}]"
            text += [label, *("".join(o["text"]) for o in outputs if o not in kept)]
            cell["outputs"] = kept
    if not text:
        log.unlink(missing_ok=True)
        return None
    return atomic_write_text(log, scrub("\n".join(t.rstrip("\n") for t in text) + "\n"))


def _has_marker(cells: list) -> bool:
    return any(c.metadata.get("effllm") == "error-here" for c in cells)


def _notebook_header(
    stem: str,
    title: str,
    entry: dict[str, Any],
    anchor: str,
    *,
    saved: bool,
    anchored: bool,
    log: Path | None,
) -> str:
    status = entry["status"]
    log_link = f' · <a href="logs/{escape(log.name)}">log</a>' if log else ""
    cls = "effllm-findings" if anchor == "effllm-findings" else "effllm-nb"
    parts = [
        f'<h1 class="{cls}" id="{anchor}">{_text(title)} <small>{escape(stem)}.ipynb · '
        f"{_badge(status)} · {entry.get('wall_s', 0):.1f} s{log_link}</small></h1>"
    ]
    if status != "ok":
        err = entry.get("error") or {}
        where = f" in cell In [{err['cell']}]" if err.get("cell") is not None else ""
        link = f' <a href="#nb-{stem}-error">Go to the failing cell.</a>' if anchored else ""
        missing = "" if saved else " No executed notebook was saved."
        parts.append(
            f'<div class="effllm-failure"><strong>{escape(stem)} failed{where}; what follows is partial.'
            f"</strong>{link}{missing}<pre>{_error(entry)}</pre></div>"
        )
    params = escape(json.dumps(entry.get("parameters", {}), indent=1, default=str))
    parts.append(f"<details><summary>Parameters</summary><pre>{params}</pre></details>")
    return "\n".join(parts)


def _toc(toc: list[tuple[str, str, str, list[tuple[str, str]]]]) -> str:
    """One line per notebook (its sections folded away beneath it), so the findings start on screen."""
    items = []
    for anchor, title, status, sections in toc:
        subs = "".join(f'<li><a href="#{a}">{_text(t)}</a></li>' for a, t in sections)
        link = f'<a href="#{anchor}">{_text(title)}</a> {_badge(status)}'
        items.append(
            f"<li><details><summary>{link}</summary><ul>{subs}</ul></details></li>"
            if subs
            else f"<li>{link}</li>"
        )
    items.append('<li><a href="#effllm-provenance">Provenance</a></li>')
    return f'<nav id="effllm-toc"><h2>Contents</h2><ol>{"".join(items)}</ol></nav>'


def _subtitle(record: dict[str, Any]) -> str:
    """What was run where: profile, date, hardware, and how many notebooks ran in how long."""
    prov, entries = record.get("provenance", {}), record["notebooks"].values()
    hw = prov.get("hardware", {})
    gpus = ", ".join(g["name"] for g in hw.get("gpus", []) if g.get("name"))
    ok = sum(e["status"] == "ok" for e in entries)
    minutes = sum(e.get("wall_s", 0) for e in entries) / 60
    where = f"{hw.get('cpu')} ({hw.get('logical_cores')} logical cores)" + (f", {gpus}" if gpus else "")
    date = str(prov.get("date_utc", ""))[:16].replace("T", " ")
    return (
        f'<p class="effllm-subtitle">Profile <strong>{escape(str(record.get("profile")))}</strong>, '
        f"{escape(date)} UTC, on {escape(where)}: {ok} of {len(entries)} "
        f"notebooks ok in {minutes:.1f} min.</p>"
    )


def _provenance(record: dict[str, Any], meta: dict[str, dict]) -> str:
    """Provenance at the end, one small table per group; the run group holds every notebook's status."""
    groups = provenance.describe(record.get("provenance", {}), meta)
    groups["Run"] = [("Run", record.get("run")), ("Profile", record.get("profile")), *groups["Run"]]
    parts = ['<h1 class="effllm-provenance" id="effllm-provenance">Provenance</h1>']
    for name, rows in groups.items():
        if rows:
            cells = [(escape(str(k)), escape(str(v))) for k, v in rows]
            parts.append(f"<h2>{name}</h2>{_table(('Item', 'Value'), cells)}")
    parts.append(f"<h3>Notebooks</h3>{_status(record)}")
    return "\n".join(parts)


def _status(record: dict[str, Any]) -> str:
    rows = []
    for stem, e in record["notebooks"].items():
        anchor = "effllm-findings" if stem.endswith("summary") else f"nb-{stem}"
        cells = (
            f'<a href="#{anchor}">{escape(stem)}</a>',
            _badge(e["status"]),
            f"{e.get('wall_s', 0):,.1f} s",
            escape(e.get("started_utc", "")),
            _error(e) or "—",
        )
        rows.append(cells)
    header = ("Notebook", "Status", "Wall time", "Started (UTC)", "Error")
    return _table(header, rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """An HTML table of already escaped cells, in a wrapper that scrolls on a narrow screen."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="effllm-scroll effllm-kv">{table}</div>'


def _text(markdown: str) -> str:
    return escape(markdown.replace("`", "").replace("**", ""))


def _error(entry: dict[str, Any]) -> str:
    err = entry.get("error")
    return escape(f"{err.get('ename', '?')}: {err.get('evalue', '')}") if err else ""


def _badge(status: str) -> str:
    return f'<span class="effllm-{status}">{status}</span>'


def _raw(html: str, role: str = "block") -> nbformat.NotebookNode:
    """A raw HTML cell that the template passes through unsanitised (effllm's own, escaped HTML)."""
    html = f'<div class="jp-RenderedHTMLCommon effllm-block">{html}</div>'
    return nbformat.v4.new_raw_cell(html, metadata={"raw_mimetype": "text/html", "effllm": role})
