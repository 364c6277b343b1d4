"""The rendered smoke report in a real headless Chromium: layout, code toggle, figures, and no network.

Needs the `playwright` package (requirements.txt) and a system Chromium (`.ci/run` installs Debian's);
Playwright's own browser download is never used. Skipped when either is missing.
"""

import json
import shutil
from pathlib import Path

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "browser test skipped: playwright is not installed (it is in requirements.txt; run `make setup`)",
        allow_module_level=True,
    )

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).is_file()), None)
if CHROMIUM is None:
    pytest.skip(
        "browser test skipped: no Chromium at /usr/bin/chromium or on PATH (.ci/run installs it)",
        allow_module_level=True,
    )

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL = ("file:", "data:")
WIDE, NARROW, HEIGHT = 1400, 400, 900
# nbconvert's lab template (templates/lab/base.html.j2) marks a stream output named stderr, and also an
# error's traceback, with this attribute; stdout gets data-mime-type="text/plain".
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'
CODE_INPUT = ".jp-CodeCell .jp-Cell-inputWrapper"
# What nbconvert's HTMLExporter writes into an <img> that has no alt: not a description.
NBCONVERT_NO_ALT = "No description has been provided for this image"

# notebookOf(el): the id of the notebook heading (h1.effllm-nb) before `el`, to say where something is.
NOTEBOOK_OF = """const notebookOf = el => {
  let where = "(before the first notebook)";
  for (const h of document.querySelectorAll("h1.effllm-nb")) {
    if (h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING) where = h.id;
    else break;
  }
  return where;
};"""


class Report:
    """One page of the report, with what it logged and requested since it was opened."""

    def __init__(self, browser, url: str, width: int):
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.outside: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": HEIGHT})
        # Record every request that leaves the file, and abort it so that the test never waits on a network.
        self.context.route(lambda u: not u.startswith(LOCAL), lambda route: route.abort())
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(_console(m)))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", lambda r: r.url.startswith(LOCAL) or self.outside.append(r.url))
        self.page.goto(url, wait_until="load")

    def close(self) -> None:
        self.context.close()


def _with_notebook_of(fn: str) -> str:
    """A page function (JS `arg => ...`) that may call notebookOf(el)."""
    return f"(arg) => {{ {NOTEBOOK_OF} return ({fn})(arg); }}"


def _console(msg) -> str:
    loc = msg.location or {}
    return f"{msg.text} ({loc.get('url', '?')[:80]}:{loc.get('lineNumber', '?')})"


@pytest.fixture(scope="module")
def run_dir(smoke_run) -> Path:
    run_dir = smoke_run[1]
    assert (run_dir / "report.html").is_file(), f"the smoke run wrote no {run_dir / 'report.html'}"
    return run_dir


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_report(browser, run_dir):
    """Open the report at a viewport width; every page is closed at the end of the module."""
    url = (run_dir / "report.html").resolve().as_uri()
    opened: list[Report] = []

    def open_(width: int = WIDE) -> Report:
        opened.append(Report(browser, url, width))
        return opened[-1]

    yield open_
    for report in opened:
        report.close()


@pytest.fixture(scope="module")
def wide(open_report) -> Report:
    """The report at 1400 px, only read (the toggle and the narrow checks open their own pages)."""
    return open_report(WIDE)


def test_key_findings_come_first_and_provenance_last(wide, run_dir):
    order = wide.page.evaluate(
        """() => {
      const pos = (a, b) => !!(a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING);
      const f = document.getElementById("effllm-findings");
      const p = document.getElementById("effllm-provenance");
      const top = document.getElementById("effllm-top");
      const toc = document.getElementById("effllm-toc");
      const nbs = [...document.querySelectorAll("h1.effllm-nb")];
      const last = nbs[nbs.length - 1];
      return {
        findings: !!f, provenance: !!p, top: !!top, toc: !!toc, notebooks: nbs.length,
        findings_tag: f ? f.tagName.toLowerCase() : null,
        findings_not_after_title_and_toc: f ? [top, toc].filter(x => x && !pos(x, f)).map(x => x.id) : [],
        notebooks_before_findings: f ? nbs.filter(h => !pos(f, h)).map(h => h.id) : [],
        provenance_before_findings: !!(f && p && !pos(f, p)),
        notebooks_after_provenance: p ? nbs.filter(h => !pos(h, p)).map(h => h.id) : [],
        provenance_after_last_notebook: !!(p && last && pos(last, p)),
      };
    }"""
    )
    stems = json.loads((run_dir / "run.json").read_text())["notebooks"]
    expected = sum(not s.endswith("summary") for s in stems)  # the summary is the findings section
    assert order["top"] and order["toc"], f"no h1#effllm-top or nav#effllm-toc: {order}"
    assert order["notebooks"] == expected, f"{order['notebooks']} h1.effllm-nb headings, {expected} notebooks"
    assert order["findings"], "no element with id effllm-findings (the key findings) in the report"
    assert not order["findings_not_after_title_and_toc"], (
        f"#effllm-findings comes before {order['findings_not_after_title_and_toc']}: {order}"
    )
    assert not order["notebooks_before_findings"], (
        f"notebook headings before #effllm-findings: {order['notebooks_before_findings']}"
    )
    assert order["provenance"], "no element with id effllm-provenance in the report"
    assert not order["provenance_before_findings"], "#effllm-provenance comes before #effllm-findings"
    assert order["provenance_after_last_notebook"], (
        f"#effllm-provenance is not after the last notebook heading; notebook headings after it: "
        f"{order['notebooks_after_provenance']}"
    )


def test_no_console_errors_page_errors_or_requests_outside_the_file(wide):
    wide.page.wait_for_load_state("networkidle")
    problems = {
        "console errors": wide.console_errors,
        "page errors": wide.page_errors,
        "requests outside file: and data:": wide.outside,
    }
    assert not any(problems.values()), "; ".join(f"{k}: {v[:10]}" for k, v in problems.items() if v)


def test_no_stderr_blocks(wide):
    blocks = wide.page.evaluate(
        _with_notebook_of(
            "sel => [...document.querySelectorAll(sel)].map(el => [notebookOf(el), el.textContent.trim()])"
        ),
        STDERR,
    )
    where = [w for w, _ in blocks]
    per_notebook = {w: where.count(w) for w in dict.fromkeys(where)}
    first_in, first_text = blocks[0] if blocks else (None, "")
    assert not blocks, (
        f"{len(blocks)} stderr blocks ({STDERR}), per notebook {per_notebook}; "
        f"the first, in {first_in}: {first_text[:200]!r}"
    )


def test_element_ids_are_unique(wide):
    where = wide.page.evaluate(
        _with_notebook_of(
            """() => {
      const w = {};
      for (const el of document.querySelectorAll("[id]"))
        if (el.id) (w[el.id] = w[el.id] || []).push(`${el.tagName.toLowerCase()} in ${notebookOf(el)}`);
      return w;
    }"""
        )
    )
    dups = {k: v for k, v in where.items() if len(v) > 1}
    assert where and not dups, (
        f"{len(dups)} duplicated ids, each with where it is: {dict(list(dups.items())[:20])}"
    )


def _visible_inputs(page) -> tuple[int, int]:
    return page.evaluate(
        """sel => {
      const els = [...document.querySelectorAll(sel)];
      return [els.length, els.filter(el => el.checkVisibility()).length];
    }""",
        CODE_INPUT,
    )


def test_code_toggle_shows_and_hides_the_code(open_report):
    page = open_report(WIDE).page
    button = page.locator("button#effllm-toggle")
    assert button.count() == 1, f"{button.count()} button#effllm-toggle elements"
    box = button.bounding_box()
    assert button.is_visible() and box, "button#effllm-toggle is not visible"
    inside = 0 <= box["x"] and box["x"] + box["width"] <= WIDE and 0 <= box["y"]
    assert inside and box["y"] + box["height"] <= HEIGHT, (
        f"the toggle is outside the {WIDE}x{HEIGHT} viewport: {box}"
    )
    assert "effllm-hide-code" in (page.get_attribute("body", "class") or ""), "body lacks effllm-hide-code"
    total, shown = _visible_inputs(page)
    assert total > 0, f"no code inputs ({CODE_INPUT}) in the report"
    assert shown == 0, f"{shown} of {total} code inputs are visible before the toggle is clicked"
    before = button.inner_text().strip()
    button.click()
    total, shown = _visible_inputs(page)
    after = button.inner_text().strip()
    assert shown > 0, f"after one click, none of the {total} code inputs is visible"
    assert after != before, f"the toggle's text stays {before!r} after a click"
    button.click()
    total, shown = _visible_inputs(page)
    assert shown == 0, f"after a second click, {shown} of {total} code inputs are still visible"
    assert button.inner_text().strip() == before, f"after two clicks the toggle reads {button.inner_text()!r}"


def test_every_image_has_alt_text_and_a_captioned_figure(wide):
    images = wide.page.evaluate(
        _with_notebook_of(
            """() => [...document.querySelectorAll("img")].map(img => {
        const fig = img.closest("figure");
        const cap = fig && fig.querySelector("figcaption");
        return {
          notebook: notebookOf(img), src: (img.getAttribute("src") || "").slice(0, 40),
          alt: (img.getAttribute("alt") || "").trim(), figure: !!fig,
          caption: cap ? cap.textContent.trim() : null,
        };
      })"""
        )
    )
    assert images, "no <img> in the report (the smoke run draws figures)"
    no_alt = [i for i in images if not i["alt"] or i["alt"] == NBCONVERT_NO_ALT]
    no_figure = [i for i in images if not i["figure"]]
    no_caption = [i for i in images if i["figure"] and not i["caption"]]
    assert not (no_alt or no_figure or no_caption), (
        f"of {len(images)} images, {len(no_alt)} have no alt text (or nbconvert's {NBCONVERT_NO_ALT!r}), "
        f"{len(no_figure)} are not in a <figure>, "
        f"{len(no_caption)} sit in a <figure> without a non-empty <figcaption>; "
        f"the first: {(no_alt or no_figure or no_caption)[0]}"
    )


def test_page_fits_400_px(open_report):
    page = open_report(NARROW).page
    fit = page.evaluate(
        _with_notebook_of(
            """limit => {
      const html = document.documentElement;
      // Elements inside a box that scrolls or clips them do not widen the page.
      const clipped = el => {
        for (let a = el.parentElement; a && a !== document.body && a !== html; a = a.parentElement)
          if (getComputedStyle(a).overflowX !== "visible") return true;
        return false;
      };
      const describe = (el, r) => ({
        tag: el.tagName.toLowerCase(), id: el.id, class: String(el.className).slice(0, 60),
        in: notebookOf(el), right: Math.round(r.right + window.scrollX), width: Math.round(r.width),
      });
      let widest = null, right = -Infinity;
      const over = [];  // the outermost elements reaching past the limit
      for (const el of document.body.querySelectorAll("*")) {
        const r = el.getBoundingClientRect();
        if (!r.width || clipped(el)) continue;
        const x = r.right + window.scrollX;
        if (x > right + 0.5) [right, widest] = [x, describe(el, r)];
        if (x > limit && !over.some(o => o.el.contains(el))) over.push({el, d: describe(el, r)});
      }
      return {scrollWidth: html.scrollWidth, widest, overflowing: over.length,
              first_overflowing: over.slice(0, 5).map(o => o.d)};
    }"""
        ),
        NARROW + 1,
    )
    box = page.locator("button#effllm-toggle").bounding_box()
    assert fit["scrollWidth"] <= NARROW + 1, (
        f"at {NARROW} px the page is {fit['scrollWidth']} px wide; the widest element: {fit['widest']}; "
        f"{fit['overflowing']} outermost elements reach past it, the first: {fit['first_overflowing']}"
    )
    assert box and 0 <= box["x"] and box["x"] + box["width"] <= NARROW + 1, (
        f"at {NARROW} px the toggle's box is {box}"
    )


def test_full_page_screenshots_are_saved(open_report, run_dir):
    shots = run_dir / "screenshots"
    shots.mkdir(exist_ok=True)
    for width in (WIDE, NARROW):
        path = shots / f"report-{width}.png"
        path.unlink(missing_ok=True)
        open_report(width).page.screenshot(path=str(path), full_page=True)
        assert path.is_file() and path.stat().st_size > 1000, f"no screenshot at {path}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
