"""What a researcher sees: JupyterLab as `make lab` starts it, every notebook opened in headless Chromium (Debian's
`chromium`, driven by Playwright for Python; Playwright's own browser download is never used) in a 1280 px window,
Run All in smoke mode, figures rendered as <img> and never as `<Figure ...>` text, each figure's smallest text at
least plots.MIN_TEXT_PX tall on screen, no warning on stderr, the k slider of notebook 03 redrawing its figure, a
save that leaves the tracked .py files as they were; then the executed copies `make demo` writes, showing their
widgets' last state, and the README and docs/results.md as pages.

    make test-browser    # screenshots land in runs/browser-test/ (FLEXALIGN_SCREENSHOTS to move them)

It runs on copies of the notebooks in a temporary folder, so the repository is never written."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import nbformat
import pytest

import plots
import workbook

pytestmark = pytest.mark.browser
NOTEBOOK_TIMEOUT_S = 420  # a smoke notebook: 1-2 min on 2 cores; 03 the most (12 small runs), ~4 min when busy


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise FileNotFoundError("no `chromium` on PATH: install Debian's browser (apt-get install -y chromium); "
                                "the test drives the system browser, never Playwright's download")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def screenshots():
    folder = Path(os.environ.get("FLEXALIGN_SCREENSHOTS", workbook.ROOT / "runs" / "browser-test"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def wait_for_server(url: str, token: str, server: subprocess.Popen, log: Path):
    """Until a JupyterLab server answers; an error with its log's end if it exits first. Five minutes: on a machine
    shared with others' training (load 17 on 2 cores) it took more than two to start."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within 5 minutes")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on copies of the notebooks, smoke mode, its own run folder, settings and workspace."""
    home = tmp_path_factory.mktemp("lab")
    root, run_dir, settings = home / "notebooks", home / "run", home / "settings"
    root.mkdir()
    shutil.copy(workbook.NOTEBOOKS / "jupytext.toml", root)
    for py in workbook.notebook_paths():
        shutil.copy(py, root)
        (root / py.with_suffix(".ipynb").name).write_text(jupytext.writes(workbook.to_notebook(py), fmt="ipynb"))
    # every cell stays in the page (no virtual scrolling) and the kernel starts without a dialog; the news and update
    # questions are answered by make lab's own overrides, as a person's `make lab` answers them
    path = settings / "@jupyterlab/notebook-extension/tracker.jupyterlab-settings"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"windowingMode": "none", "autoStartDefaultKernel": True}))
    overrides = home / "app-settings" / "overrides.json"
    subprocess.run(["make", "-s", f"LAB_OVERRIDES={overrides}", str(overrides)], cwd=workbook.ROOT, check=True)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, workbook.SMOKE_ENV: "1", workbook.RUN_DIR_ENV: str(run_dir), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "PYTHONPATH": str(workbook.ROOT)}
    log = open(home / "lab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
                               "--LabApp.expose_app_in_browser=True", f"--LabApp.app_settings_dir={overrides.parent}",
                               "--KernelManager.transport=ipc"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, token, server, home / "lab.log")
        yield dict(url=url, token=token, root=root, run_dir=run_dir, log=home / "lab.log")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        # the window plots.NOTEBOOK_PX is measured in: 1280 px wide, the file browser open beside the notebook
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_navigation_timeout(120_000)  # JupyterLab's first page took over 30 s on a loaded machine
        yield page
        browser.close()


def command(page, name: str):
    """Run a JupyterLab command as its menu item does (not awaited: run-all resolves only when every cell ran)."""
    page.evaluate(f"() => {{ window.jupyterapp.commands.execute('{name}'); }}")


def run_all(page, lab, name: str):
    """Open a notebook, Run All (Run menu), wait until every code cell has its execution count, save (File menu)."""
    page.goto(f"{lab['url']}/lab/tree/{name}?reset&token={lab['token']}")  # reset: only this notebook open
    page.wait_for_function("window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'",
                           timeout=120_000, polling=500)
    command(page, "notebook:run-all-cells")
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt'))"
        ".every(p => /\\[\\d+\\]/.test(p.textContent))", timeout=NOTEBOOK_TIMEOUT_S * 1000, polling=1000)
    command(page, "docmanager:save")
    path = lab["root"] / name
    for _ in range(60):
        saved = nbformat.read(path, as_version=4)
        if all(c.execution_count for c in saved.cells if c.cell_type == "code"):
            return saved
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not save {name} within 30 s")


def rendered_images(page):
    return page.locator(".jp-NotebookPanel .jp-OutputArea-output img")


def figure_texts(page) -> list[str]:
    texts = page.locator(".jp-NotebookPanel .jp-OutputArea-output").all_inner_texts()
    return [t for t in texts if "<Figure size" in t]


# An image's smallest text on screen: the height plots.png wrote into the PNG (a tEXt chunk, KEY\0value) times the
# scale the page draws the image at; null for an image that does not say it (not drawn by plots.png)
SMALLEST_TEXT_ON_SCREEN = """async (img, key) => {
    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    const view = new DataView(bytes.buffer);
    for (let at = 8; at + 8 <= bytes.length; at += 12 + view.getUint32(at)) {
        if (String.fromCharCode(...bytes.subarray(at + 4, at + 8)) !== 'tEXt') continue;
        const chunk = bytes.subarray(at + 8, at + 8 + view.getUint32(at));
        const [name, value] = new TextDecoder('latin1').decode(chunk).split('\\0');
        if (name === key) return parseFloat(value) * img.getBoundingClientRect().width / img.naturalWidth;
    }
    return null;
}"""


def check_figure_text(page, name: str):
    """Every image of the page's notebook shows its smallest text at least plots.MIN_TEXT_PX tall."""
    images = rendered_images(page)
    sizes = [images.nth(i).evaluate(SMALLEST_TEXT_ON_SCREEN, plots.SMALLEST_TEXT) for i in range(images.count())]
    small = [(i, size) for i, size in enumerate(sizes) if size is None or size < plots.MIN_TEXT_PX]
    assert not small, f"{name}: images (index, smallest text px on screen; None: not drawn by plots.png): {small}"


def cell_screenshot(page, text: str, path: Path):
    """A screenshot of the last cell of the open notebook that shows `text`."""
    cell = page.locator(".jp-NotebookPanel .jp-Cell").filter(has_text=text).last
    cell.evaluate("cell => cell.querySelectorAll('details').forEach(d => { d.open = true; })")  # a table one click away
    viewport = page.viewport_size
    # the notebook scrolls inside the page: a cell taller than the window is captured whole only in a taller one
    page.set_viewport_size({**viewport, "height": max(viewport["height"], round(cell.bounding_box()["height"]) + 300)})
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=path)
    page.set_viewport_size(viewport)
    return cell


@pytest.mark.parametrize("py", workbook.notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_in_the_browser_and_shows_its_figures(py, lab, page, screenshots):
    name = py.with_suffix(".ipynb").name
    saved = run_all(page, lab, name)
    errors = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    warned = [o.text for c in saved.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr" and "Warning" in o.text]
    assert not warned, f"{name} warns in smoke mode: {warned[0][:300]}"
    figures = sorted((lab["run_dir"] / "figures").glob(f"{py.stem[:2]}_*.png"))
    images = rendered_images(page)
    widths = [images.nth(i).evaluate("img => img.naturalWidth") for i in range(images.count())]
    assert len(widths) >= len(figures) and all(w > 100 for w in widths), \
        f"{name}: {len(figures)} figures saved, {len(widths)} shown as images (natural widths {widths})"
    assert not figure_texts(page), f"{name} shows a figure as text: {figure_texts(page)[0][:80]}"
    check_figure_text(page, name)
    assert page.get_by_text("Smoke mode").count() >= 1, "the smoke-mode note is missing"
    cell_screenshot(page, "Smoke mode", screenshots / f"{py.stem}-smoke-note.png")
    # the repository's file and the one JupyterLab just saved: identical, outputs and metadata stay in the .ipynb
    assert (lab["root"] / py.name).read_text() == py.read_text(), f"saving {name} changed {py.name}"
    images.first.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / f"{py.stem}-first-figure.png")
    images.last.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / f"{py.stem}-last-figure.png")
    for text, shot in SHOWN.get(py.stem[:2], {}).items():
        cell = cell_screenshot(page, text, screenshots / f"{py.stem}-{shot}.png")
        wider = cell.evaluate("""cell => [...cell.querySelectorAll('.jp-OutputArea-output table')].map(table =>
            [table.getBoundingClientRect().width, table.closest('.jp-OutputArea-output').clientWidth])
            .filter(([table, area]) => table > area)""")
        assert not wider, f"{name}: tables wider than their output area (table, area px): {wider}"
    if py.stem.startswith("03"):
        check_k_slider(page, screenshots / py.stem)
    shut_down_kernels(lab)


# cells a reviewer looks at in the browser (what issue 40 found wrong, fixed; the stage shares figure): text in the
# cell -> the screenshot's name
SHOWN = {"03": {"The whole study table": "study-figure-and-table", "inside the target corner": "tradeoff-in-words",
                "stage_shares = audit.variance_shares": "factor-stages"},
         "04": {"attributes:": "accuracy-in-words"}}


def shut_down_kernels(lab):
    """As a person closing the notebook would: its kernel stops, so the next notebook has the machine."""
    api = f"{lab['url']}/api/sessions"
    headers = {"Authorization": f"token {lab['token']}"}
    for session in json.load(urllib.request.urlopen(urllib.request.Request(api, headers=headers))):
        urllib.request.urlopen(urllib.request.Request(f"{api}/{session['id']}", headers=headers, method="DELETE"))


def check_k_slider(page, prefix: Path):
    """Drag-equivalent on the NeighbourViewer: the slider handle takes arrow keys like a person's keyboard."""
    viewer = page.locator(".jp-NotebookPanel .widget-vbox").filter(has=page.locator(".widget-slider")).last
    image = viewer.locator(".widget-image")
    label = viewer.locator(".widget-readout").first
    viewer.scroll_into_view_if_needed()
    before_k, before_src = label.inner_text(), image.get_attribute("src")
    viewer.screenshot(path=f"{prefix}-slider-before.png")
    viewer.locator(".noUi-handle").first.click()
    viewer.locator(".noUi-handle").first.press("Home")  # the first k: one token
    page.wait_for_function("([el, src]) => el.getAttribute('src') !== src", arg=[image.element_handle(), before_src],
                           timeout=30_000)
    after_k = label.inner_text()
    viewer.screenshot(path=f"{prefix}-slider-after.png")
    assert after_k != before_k and after_k.strip() == "1"
    assert image.evaluate("img => img.naturalWidth") > 100


def open_in_lab(page, lab, path: str):
    """Open a notebook without running it, as a person opens a file; returns when its outputs are on the page."""
    page.goto(f"{lab['url']}/lab/tree/{path}?reset&token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel .jp-OutputArea-output", timeout=120_000)


@pytest.mark.parametrize("stem,widget", [("03_prefix_quality", "img"), ("04_captioning", "table")])
def test_executed_notebooks_show_their_widgets_last_state(stem, widget, lab, page, screenshots):
    """The executed copy `make demo` writes (workbook.execute; here in smoke mode, on the runs the notebooks above
    trained), opened in JupyterLab: 03's k viewer and 04's k table show as they were left, no widget as the text
    `VBox(children=(...` or `interactive(...`, and every figure's text is readable."""
    executed = workbook.execute(workbook.NOTEBOOKS / f"{stem}.py", lab["run_dir"], smoke=True)
    (lab["root"] / "executed").mkdir(exist_ok=True)
    shutil.copy(executed, lab["root"] / "executed" / executed.name)
    open_in_lab(page, lab, f"executed/{executed.name}")
    texts = page.locator(".jp-NotebookPanel .jp-OutputArea-output").all_inner_texts()
    as_text = [t for t in texts if "VBox(" in t or "interactive(" in t]
    assert not as_text, f"executed {stem} shows a widget as text: {as_text[0][:80]}"
    check_figure_text(page, f"executed {stem}")
    cell = cell_screenshot(page, "the widget's last state", screenshots / f"executed-{stem}-widget.png")
    shown = cell.locator(f".jp-OutputArea-output {widget}").count()
    assert shown, f"executed {stem}: the widget's last state shows no {widget}"
    shut_down_kernels(lab)


@pytest.mark.parametrize("document", ["README.md", "docs/results.md"])
def test_the_readme_and_the_results_read_as_pages(document, lab, page, screenshots):
    """The README as a reference and docs/results.md, every number with its source, as JupyterLab previews them."""
    for name in (document, "docs/prefix_quality.png"):
        (lab["root"] / name).parent.mkdir(exist_ok=True)
        shutil.copy(workbook.ROOT / name, lab["root"] / name)
    page.goto(f"{lab['url']}/lab?reset&token={lab['token']}")
    page.wait_for_function("window.jupyterapp?.commands.hasCommand('docmanager:open')", timeout=120_000)
    page.evaluate(f"() => window.jupyterapp.commands.execute('docmanager:open', "
                  f"{{path: '{document}', factory: 'Markdown Preview'}})")
    page.locator(".jp-RenderedMarkdown h1").first.wait_for(timeout=60_000)
    page.screenshot(path=screenshots / f"{Path(document).stem}.png")


def test_lab_asks_no_news_question_and_its_kernels_never_warn(lab, page, screenshots):
    """After every notebook above ran: no "notified about news" question on the page, and no kernel start wrote
    "running over TCP without encryption" into the server's log (kept beside the screenshots)."""
    page.goto(f"{lab['url']}/lab/tree/{workbook.notebook_paths()[0].with_suffix('.ipynb').name}?token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel", timeout=120_000)
    time.sleep(10)  # JupyterLab asks its question a few seconds after the page loads
    page.screenshot(path=screenshots / "lab-no-news-question.png")
    assert page.get_by_text("official Jupyter news").count() == 0
    shutil.copy(lab["log"], screenshots / "lab.log")
    assert "without encryption" not in lab["log"].read_text()
