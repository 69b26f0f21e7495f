"""What a researcher sees: JupyterLab from the project's virtualenv, every notebook opened in headless Chromium
(Debian's `chromium`, driven by Playwright for Python; Playwright's own browser download is never used), Run All
in smoke mode, figures rendered as <img> and never as `<Figure ...>` text, the k slider of notebook 03 redrawing
its figure, and a save that leaves the tracked .py files as they were.

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
    """Until a JupyterLab server answers; an error with its log's end if it exits first."""
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within 2 minutes")


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
    # every cell stays in the page (no virtual scrolling), the kernel starts without a dialog, and no update or
    # news pop-ups cover the page
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
                           "apputils-extension/notification": {"checkForUpdates": False, "fetchNews": "false"}}.items():
        package, name = plugin.split("/")
        path = settings / f"@jupyterlab/{package}" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, workbook.SMOKE_ENV: "1", workbook.RUN_DIR_ENV: str(run_dir), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "PYTHONPATH": str(workbook.ROOT)}
    log = open(home / "lab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
                               "--LabApp.expose_app_in_browser=True"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, token, server, home / "lab.log")
        yield dict(url=url, token=token, root=root, run_dir=run_dir)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
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


@pytest.mark.parametrize("py", workbook.notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_in_the_browser_and_shows_its_figures(py, lab, page, screenshots):
    name = py.with_suffix(".ipynb").name
    saved = run_all(page, lab, name)
    errors = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    figures = sorted((lab["run_dir"] / "figures").glob(f"{py.stem[:2]}_*.png"))
    images = rendered_images(page)
    widths = [images.nth(i).evaluate("img => img.naturalWidth") for i in range(images.count())]
    assert len(widths) >= len(figures) and all(w > 100 for w in widths), \
        f"{name}: {len(figures)} figures saved, {len(widths)} shown as images (natural widths {widths})"
    assert not figure_texts(page), f"{name} shows a figure as text: {figure_texts(page)[0][:80]}"
    assert page.get_by_text("Smoke mode").count() >= 1, "the smoke-mode note is missing"
    # the repository's file and the one JupyterLab just saved: identical, outputs and metadata stay in the .ipynb
    assert (lab["root"] / py.name).read_text() == py.read_text(), f"saving {name} changed {py.name}"
    images.first.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / f"{py.stem}-first-figure.png")
    images.last.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / f"{py.stem}-last-figure.png")
    if py.stem.startswith("03"):
        check_k_slider(page, screenshots / py.stem)
    shut_down_kernels(lab)


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
