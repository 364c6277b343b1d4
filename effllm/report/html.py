"""Render a run (`run.json` + executed notebooks) into one self-contained report.html with nbconvert.

The executed notebooks are merged behind a title, a table of contents, a provenance table and a status
table; each notebook sits under its own heading, a failed one behind a red box naming its error.
Code input is hidden by default behind a toggle button. Images are embedded as base64 data URIs and no
script is loaded from the network (require.js, MathJax and mermaid are left out: TeX shows as source).
The page template is `templates/report.html.j2`, an extension of nbconvert's `lab` template.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path
from typing import Any

import nbformat

from effllm.files import atomic_write_text
from effllm.report import provenance
from effllm.report.record import read_run_json

HEADING = re.compile(r"^(#{1,2})\s+(.+?)\s*#*\s*$")
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
TEMPLATES = Path(__file__).parent / "templates"  # report.html.j2, shipped as package data


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
    return atomic_write_text(run_dir / "report.html", html)


def merge(run_dir: Path, record: dict[str, Any]) -> nbformat.NotebookNode:
    """One notebook: title, contents, provenance, status, then every notebook under its own heading."""
    body, toc, metadata = [], [], {}
    for stem, entry in record["notebooks"].items():
        path = run_dir / "notebooks" / f"{stem}.ipynb"
        nb = nbformat.read(path, as_version=4) if path.exists() else None
        cells, title, sections = _notebook_cells(nb, stem) if nb else ([], stem, [])
        metadata = metadata or (nb.metadata if nb else {})
        toc.append((stem, title, entry["status"], sections))
        header = _notebook_header(stem, title, entry, saved=nb is not None, anchored=_has_marker(cells))
        body += [_raw(header), *cells]
    title = f"effllm report: {record.get('run', run_dir.name)}"
    head = [
        f'<h1 id="effllm-top">{escape(title)}</h1>',
        _toc(toc),
        _provenance(record, provenance.notebook_meta(run_dir / "results")),
        _status(record),
    ]
    cells = [_raw(h) for h in head] + body
    for i, cell in enumerate(cells):
        cell["id"] = f"c{i}"  # cell ids must be unique across the merged notebooks
    merged = nbformat.v4.new_notebook(cells=cells)
    merged.metadata.update({k: metadata[k] for k in ("kernelspec", "language_info") if k in metadata})
    merged.metadata["title"] = title
    return merged


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


def _has_marker(cells: list) -> bool:
    return any(c.metadata.get("effllm") == "error-here" for c in cells)


def _notebook_header(stem: str, title: str, entry: dict[str, Any], *, saved: bool, anchored: bool) -> str:
    status = entry["status"]
    parts = [
        f'<h1 class="effllm-nb" id="nb-{stem}">{_text(title)} <small>{escape(stem)}.ipynb · '
        f"{_badge(status)} · {entry.get('wall_s', 0):.1f} s</small></h1>"
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
    items = [f'<li><a href="#effllm-{a}">{a.title()}</a></li>' for a in ("provenance", "status")]
    for stem, title, status, sections in toc:
        subs = "".join(f'<li><a href="#{a}">{_text(t)}</a></li>' for a, t in sections)
        items.append(f'<li><a href="#nb-{stem}">{_text(title)}</a> {_badge(status)}<ul>{subs}</ul></li>')
    return f'<nav id="effllm-toc"><h2>Contents</h2><ol>{"".join(items)}</ol></nav>'


def _provenance(record: dict[str, Any], meta: dict[str, dict]) -> str:
    rows = [("Run", record.get("run")), ("Profile", record.get("profile"))]
    rows += provenance.describe(record.get("provenance", {}), meta)
    rows = [(escape(str(k)), escape(str(v))) for k, v in rows]
    return f'<h2 id="effllm-provenance">Provenance</h2>{_table(("Item", "Value"), rows)}'


def _status(record: dict[str, Any]) -> str:
    rows = []
    for stem, e in record["notebooks"].items():
        cells = (
            f'<a href="#nb-{stem}">{escape(stem)}</a>',
            _badge(e["status"]),
            f"{e.get('wall_s', 0):.1f} s",
        )
        rows.append((*cells, escape(e.get("started_utc", "")), _error(e)))
    header = ("Notebook", "Status", "Wall time", "Started (UTC)", "Error")
    return f'<h2 id="effllm-status">Status</h2>{_table(header, rows)}'


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """An HTML table of already escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
