"""Open a Snakemake HTML report in headless Chromium and read it the way a person does.

`snakemake --report` writes one self-contained single-page app (React; results embedded as data
URIs, tables shown in an iframe, figures as <img>). Nothing but a browser tells whether it renders:
this module clicks through the menu (category -> result -> eye button, then the info button for
the caption) and records what is on screen, every page error, console error and failed request,
and any request that leaves the file (a CDN or font fetch would fail for a reader offline).

Used by tests/test_pipeline_e2e.py; also runnable on an existing report:
``python tests/report_browser.py report.html OUT_DIR``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers, root), nothing that phones home: the only requests left are the page's own.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
TIMEOUT_MS = 15_000
# reStructuredText that docutils did not render: a reader would see the markup itself.
RAW_RST = re.compile(r"``|`_|:(ref|doc|math|code):`|^\.\. ", re.MULTILINE)
NUMBER = re.compile(r"^[−-]?\d+(\.\d+)?")
# What a reader looks for, by the labels that workflow/rules/results.smk gives the report() outputs:
# table label -> short name (category "Tables"); figure label -> its category.
TABLES = {"classification (Tab.1/2)": "classification", "dense (Tab.6)": "dense", "robustness (Tab.8)": "robustness"}
FIGURES = {"losses": "Pretraining", "robustness curves": "Evaluation", "vit_tiny": "Attention maps"}


@dataclass
class ReportView:
    """What the browser showed, and every error it met on the way."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    statistics_charts: int = 0
    # reader's steps whose result never showed up (timed out), with the locator that waited
    not_shown: list[str] = field(default_factory=list)
    # table label -> body rows (cell texts) read from the iframe the report shows it in
    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    # figure label -> (naturalWidth, naturalHeight, width shown on screen)
    figures: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # result label -> caption text as rendered in the result's info panel
    captions: dict[str, str] = field(default_factory=dict)
    screenshots: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """Everything a reader would see as broken: errors, offline fetches, empty tables, blank figures,
        captions missing or showing raw markup."""
        out = [f"page error: {e}" for e in self.page_errors] + [f"console error: {e}" for e in self.console_errors]
        out += [f"failed request: {r}" for r in self.failed_requests]
        out += [f"external request (fails offline): {r}" for r in self.external_requests]
        out += [f"not shown: {what}" for what in self.not_shown]
        for label, rows in self.tables.items():
            if not any(NUMBER.match(cell) for row in rows for cell in row[1:]):
                out.append(f"table {label!r} shows no number: {rows}")
        for label, (width, height, shown) in self.figures.items():
            if not (width > 0 and height > 0 and shown > 0):
                out.append(f"figure {label!r} not rendered: natural {width}x{height}, shown {shown}px wide")
        for label, text in self.captions.items():
            if len(text) < 40 or RAW_RST.search(text):
                out.append(f"caption of {label!r} empty or raw markup: {text[:200]!r}")
        return out


def browser_available() -> str | None:
    """None when the check can run, else why not (the test's skip reason)."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} missing (Debian package chromium; setup.sh --test installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "python package playwright missing (setup.sh --test installs it)"
    return None


def view_report(report: Path, out_dir: Path, *, tables: dict[str, str] = TABLES,
                figures: dict[str, str] = FIGURES) -> ReportView:
    """Open ``report`` and show every table (category "Tables", label -> short name) and figure
    (label -> category); screenshots go to ``out_dir``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, sync_playwright

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    view = ReportView()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda error: view.page_errors.append(str(error)))
            page.on("console", lambda msg: view.console_errors.append(msg.text) if msg.type == "error" else None)
            page.on("requestfailed", lambda r: view.failed_requests.append(f"{r.url[:120]} ({r.failure})"))
            page.on("request", lambda r: None if r.url.startswith(LOCAL_SCHEMES)
                    else view.external_requests.append(r.url))

            def slug(text: str) -> str:
                return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")

            def shot(name: str) -> None:
                path = out_dir / f"{len(view.screenshots):02d}_{name}.png"
                page.screenshot(path=str(path))
                view.screenshots.append(str(path))

            page.goto(report.resolve().as_uri(), wait_until="load")
            nav = page.locator("nav").first  # the navigation panel; content is shown beside it
            content = page.locator("div.grow.h-screen")
            nav.get_by_role("link", name="Tables", exact=True).wait_for()
            view.categories = [t.strip() for t in page.evaluate("Object.keys(categories)")]
            shot("home")

            def attempt(what: str, step) -> None:
                """Run one reader's step; what did not show up in time is a problem (with a screenshot of
                the page as it was), not an exception that would hide the remaining steps."""
                try:
                    step()
                except PlaywrightTimeout as error:
                    view.not_shown.append(f"{what}: {str(error).splitlines()[0]}")
                    shot(f"not_shown_{slug(what)}")

            def statistics() -> None:
                """Vega charts of the runtimes, drawn in the page (a broken bundle draws nothing)."""
                nav.get_by_role("link", name="Statistics", exact=True).click()
                charts = content.locator(".vega-embed .marks")  # the plot itself, canvas or svg
                charts.first.wait_for()
                view.statistics_charts = charts.count()
                shot("statistics")

            def row_of(label: str):
                cell = page.locator("td", has_text=re.compile(f"^{re.escape(label)}$"))
                return nav.locator("tr").filter(has=cell)

            def open_result(category: str, label: str) -> None:
                """Home breadcrumb -> category in the menu -> the eye button on the row labelled ``label``."""
                nav.locator("nav li a").first.click()
                nav.get_by_role("link", name=category, exact=True).click()
                row_of(label).locator("a[type=button]").first.click()

            def caption(label: str) -> None:
                """The row's info button: the caption (docutils HTML) is the "Description" item."""
                row_of(label).locator("a[type=button]").nth(1).click()
                item = nav.locator("li.prose")
                item.wait_for()
                view.captions[label] = item.inner_text().strip()

            # Each result twice: as the eye button shows it (menu panel narrow), then with its info panel
            # (caption) open beside it, which is how a reader checks what a table or figure means.
            def table(label: str, name: str) -> None:
                open_result("Tables", label)
                body = page.frame_locator("iframe").locator("table.results tbody tr")
                body.first.wait_for()
                view.tables[label] = [[c.strip() for c in row.locator("td").all_inner_texts()] for row in body.all()]
                shot(f"table_{name}")
                caption(label)
                shot(f"table_{name}_caption")

            def figure(label: str, category: str) -> None:
                open_result(category, label)
                img = content.locator("img")
                img.wait_for()
                page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
                view.figures[label] = tuple(img.evaluate("i => [i.naturalWidth, i.naturalHeight, i.clientWidth]"))
                shot(f"figure_{slug(label)}")
                caption(label)
                shot(f"figure_{slug(label)}_caption")

            attempt("statistics", statistics)
            for label, name in tables.items():
                attempt(f"table {label}", lambda label=label, name=name: table(label, name))
            for label, category in figures.items():
                attempt(f"figure {label}", lambda label=label, category=category: figure(label, category))
        finally:
            browser.close()
    view.seconds = time.perf_counter() - start
    return view


if __name__ == "__main__":
    result = view_report(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(asdict(result), indent=1, ensure_ascii=False))
    print("problems:", result.problems() or "none")
