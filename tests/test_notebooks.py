"""Every notebook runs top to bottom in smoke mode, in order, in one run folder (as `make demo` runs them) and
shows every figure it makes as an image; the tracked .py sources stay as JupyterLab writes them, so opening,
running and saving a notebook changes nothing but what the person edited; their prose states no measured number."""
import base64
import json
import re
import shutil
import struct
import subprocess

import jupytext
import nbformat
import pytest

import audit
import core
import demo
import plots
import study
import workbook

NOTEBOOKS = workbook.notebook_paths()


def test_there_are_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_py_source_is_in_the_form_jupyterlab_saves(py):
    assert py.read_text() == workbook.canonical_py(py), f"{py.name} has a metadata header or cell metadata: run `make sync`"
    nb = workbook.to_notebook(py)
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with a paragraph saying what it shows"


# Numbers a notebook's prose may state: the parameters a reader sets or a target is defined by, each checked against
# the code that holds it, so the prose cannot drift from it. Anything else, a measured number, is built in a code
# cell from the result it reports (IPython.display.Markdown), or the prose says what the figure shows without it.
ALLOWED_NUMBERS = {  # number -> (the notebooks that may state it, what it is, that the code holds it)
    "0.5": (("01", "03"), "the R² a fine factor must reach from the frozen tokens (audit.READABLE, notebook 01) and "
            "the linear nested-dropout mode's drop probability on the last register (core.ModelConfig, notebook 03)",
            lambda: audit.READABLE == core.ModelConfig().nested_dropout_rate == 0.5),
    "0.15": (("03",), "the leakage bound of the workbook's target corner", lambda: study.TARGET[study.LEAK] == 0.15),
    "0.9": (("03",), "the factor-level R@1 of the workbook's target corner", lambda: study.TARGET[study.RETRIEVAL] == 0.9),
}
# a decimal number or a percentage; `code spans` are names and command lines (Qwen2.5-1.5B), not claims
NUMBER = re.compile(r"(?<![\w.])\d*\.\d+(?![\w.])|\d+(?:\.\d+)?\s?%")


def stated_numbers(markdown: str, notebook: str) -> list[str]:
    """The numbers `markdown` states that notebook `notebook` ("03") may not."""
    return [n for n in NUMBER.findall(re.sub(r"`[^`]*`", "", markdown))
            if notebook not in ALLOWED_NUMBERS.get(n, ((),))[0]]


def test_the_allowed_numbers_are_the_codes_parameters():
    assert all(holds() for _, _, holds in ALLOWED_NUMBERS.values())


def test_the_number_check_finds_results_in_prose():
    assert stated_numbers("stays at R@1 0.86 or below (leakage ≤ 0.15), 83 % of the attributes", "03") == ["0.86", "83 %"]
    assert stated_numbers("k = 1, 2, 4; 2000 rows; `Qwen/Qwen2.5-1.5B`; drop probability 0.5; v4; R@1 ≥ 0.9", "03") == []
    assert stated_numbers("the probe read ~0.9", "04") == ["0.9"]  # a parameter's value is a result elsewhere


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_prose_states_no_measured_number(py):
    """A sentence with a number typed into it goes stale the moment a run changes (notebook 03 once said R@1 0.86
    where its own table showed 0.895)."""
    stated = {i: numbers for i, cell in enumerate(workbook.to_notebook(py).cells)
              if cell.cell_type == "markdown" and (numbers := stated_numbers(cell.source, py.name[:2]))}
    assert not stated, f"{py.name}: Markdown cells (by index) state numbers; build the sentence from the result: {stated}"


def test_ipynb_working_copies_are_not_tracked():
    tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=workbook.ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked and not [p for p in tracked if p.endswith(".ipynb")]
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/01_data_and_encoders.ipynb"], cwd=workbook.ROOT)
    assert ignored.returncode == 0, "notebooks/*.ipynb must be in .gitignore"


def test_saving_in_jupyterlab_writes_only_the_edit_into_the_py(tmp_path):
    """What JupyterLab does on save, through jupytext's contents manager and notebooks/jupytext.toml: a run
    notebook (outputs, execution counts, kernel and language metadata, cell metadata) leaves the .py as it
    was; an edited cell changes exactly that line."""
    from jupytext import TextFileContentsManager
    py = NOTEBOOKS[0]
    shutil.copy(py, tmp_path / py.name)
    shutil.copy(workbook.NOTEBOOKS / "jupytext.toml", tmp_path / "jupytext.toml")
    (tmp_path / py.with_suffix(".ipynb").name).write_text(jupytext.writes(workbook.to_notebook(py), fmt="ipynb"))
    manager = TextFileContentsManager(root_dir=str(tmp_path))
    name = py.with_suffix(".ipynb").name
    nb = manager.get(name)["content"]
    nb.metadata.update(kernelspec={"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                       language_info={"name": "python", "version": "3.11.2"})
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "x"})]
        cell.metadata.update(scrolled=True, tags=["mine"], execution={"iopub.status.busy": "2026-01-01T00:00:00Z"})
    manager.save({"type": "notebook", "content": nb}, name)
    assert (tmp_path / py.name).read_text() == py.read_text()
    code[0].source += "\nprint('an edit')"
    manager.save({"type": "notebook", "content": nb}, name)
    lines, saved = py.read_text().splitlines(), (tmp_path / py.name).read_text().splitlines()
    assert len(saved) == len(lines) + 1 and saved[len(saved) - len(lines) - 1:] != lines
    assert [line for line in saved if line not in lines] == ["print('an edit')"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke-run")


def outputs(nb, kind=None):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind is None or o.output_type == kind]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode_and_shows_its_figures(py, run_dir):
    executed = workbook.execute(py, run_dir, smoke=True)
    nb = nbformat.read(executed, as_version=4)
    assert not outputs(nb, "error")
    prefix = py.stem[:2]
    figures = list((run_dir / "figures").glob(f"{prefix}_*.png"))
    assert figures, f"{py.name} saved no figure"
    assert all(f.stat().st_size > 5_000 for f in figures), "an empty-looking figure was saved"
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= len(figures), f"{py.name} saved {len(figures)} figures but shows {len(images)} images"
    widths = [struct.unpack(">I", base64.b64decode(o["data"]["image/png"])[16:20])[0] for o in images]
    assert max(widths) <= plots.NOTEBOOK_PX, f"{py.name} shows a figure {max(widths)} px wide: JupyterLab shrinks it " \
        f"to its {plots.NOTEBOOK_PX} px output area, and its text below {plots.MIN_TEXT_PX} px (tests/test_plots.py)"
    as_text = [o for o in outputs(nb) if o.get("data", {}).get("text/plain", "").startswith("<Figure size")
               and "image/png" not in o["data"]]
    assert not as_text, f"{py.name} shows a figure as text: {as_text[0]['data']['text/plain']}"
    widget_text = [o["data"]["text/plain"] for o in outputs(nb) if re.match(r"(VBox|HBox|interactive)\(",
                                                                             o.get("data", {}).get("text/plain", ""))]
    assert not widget_text, f"{py.name} shows a widget as its text repr, not its last state: {widget_text[0][:80]}"
    tables = [o["data"]["text/html"] for o in outputs(nb) if "<table" in o.get("data", {}).get("text/html", "")]
    unrounded = [n for table in tables for n in re.findall(r">\s*(-?\d*\.\d*[1-9]\d{3,}|-?\d[\d.]*e[-+]\d+)\s*<", table)]
    assert not unrounded, f"{py.name} shows numbers unrounded or with exponents in a table: {unrounded[:5]}"
    warned = [o.text for o in outputs(nb, "stream") if o.name == "stderr" and "Warning" in o.text]
    assert not warned, f"{py.name} warns in smoke mode (its own smoke sizes must not cause one): {warned[0][:300]}"
    smoke_note = [o for o in outputs(nb) if "Smoke mode" in o.get("data", {}).get("text/html", "")]
    assert smoke_note, f"{py.name} does not say that smoke-mode numbers are not meaningful"
    numbers = json.loads((run_dir / "numbers.json").read_text()) if (run_dir / "numbers.json").exists() else {}
    assert any(section.startswith(prefix) for section in numbers), f"{py.name} recorded no key numbers"


def test_smoke_sessions_have_their_own_run_folder(monkeypatch):
    monkeypatch.delenv(workbook.RUN_DIR_ENV, raising=False)
    monkeypatch.setenv(workbook.SMOKE_ENV, "1")
    smoke_dir = workbook.settings()[1]
    monkeypatch.setenv(workbook.SMOKE_ENV, "0")
    assert smoke_dir != workbook.settings()[1] and smoke_dir.name == "lab-smoke"


def test_report_collects_numbers_and_figures(run_dir):
    report = workbook.write_report(run_dir, {"01_data_and_encoders": 1.0}, smoke=True).read_text()
    assert "(smoke mode)" in report and "![" in report and "| quantity | value |" in report


def test_rerunning_one_notebook_keeps_the_numbers_of_the_others(tmp_path, monkeypatch):
    (tmp_path / "numbers.json").write_text(json.dumps({"01 data": {"a": 1}, "02 phase 1": {"b": 2, "stale": 0}}))
    (tmp_path / "timings.json").write_text(json.dumps({"01_data_and_encoders": 60.0}))

    def fake_execute(path, out_dir, smoke, threads, children, threads_file):  # what a notebook does: record its own section
        numbers = json.loads((out_dir / "numbers.json").read_text())
        (out_dir / "numbers.json").write_text(json.dumps({**numbers, "02 phase 1": {"b": 3}}))

    monkeypatch.setattr(demo, "run_notebook", fake_execute)
    report = demo.run(tmp_path, smoke=True, only=["02"]).read_text()
    assert json.loads((tmp_path / "numbers.json").read_text()) == {"01 data": {"a": 1}, "02 phase 1": {"b": 3}}
    assert "| 01_data_and_encoders | 1.0 |" in report and "02_phase1_training" in report


def test_an_interrupted_workbook_continues_where_it_stopped(tmp_path, monkeypatch):
    """make demo after Ctrl-C: the notebooks finished are skipped, the interrupted one runs again; a run that
    completes leaves no progress behind, so the next make demo runs every notebook."""
    ran, stop_at = [], ["02_phase1_training"]

    def fake_execute(path, out_dir, smoke, threads, children, threads_file):
        ran.append(path.stem)
        if path.stem in stop_at:
            raise KeyboardInterrupt
        (out_dir / path.with_suffix(".ipynb").name).write_text("{}")

    # one after another: a known order
    monkeypatch.setattr(demo, "AFTER", {b.name[:2]: (a.name[:2],) for a, b in zip(NOTEBOOKS, NOTEBOOKS[1:])})
    monkeypatch.setattr(demo, "EARLY_START", {})
    monkeypatch.setattr(demo, "run_notebook", fake_execute)
    with pytest.raises(KeyboardInterrupt):
        demo.run(tmp_path, smoke=True)
    assert ran == ["01_data_and_encoders", "02_phase1_training"]
    ran.clear(), stop_at.clear()
    demo.run(tmp_path, smoke=True)
    names = [p.stem for p in workbook.notebook_paths()]
    assert ran == names[1:] and not (tmp_path / "progress.json").exists()
    ran.clear()
    demo.run(tmp_path, smoke=True)
    assert ran == names


def test_the_training_progress_bar_names_its_run(run_dir):
    """Notebook 02's bar says which run it trains (tqdm's text fallback of its widget), by its last two folders,
    which also tell a study's runs apart (default/seed-0, stop-gradient/seed-0)."""
    nb = nbformat.read(run_dir / "02_phase1_training.ipynb", as_version=4)
    bars = {o["data"]["text/plain"].split(":")[1].strip() for o in outputs(nb)
            if o.get("data", {}).get("text/plain", "").startswith("phase 1: ")}
    assert bars == {"phase1/default"}


def test_waiting_for_a_cells_reply_never_hangs_on_one_unbounded_poll():
    """workbook.execute waits for each reply in bounded polls (nbclient issue 312: an unbounded poll of the shell
    socket can miss a reply when the cell shows widgets). A poll that misses the message when unbounded, as that
    bug does, hangs; the stepped wait returns the message, and a bounded wait keeps its own timeout."""
    import asyncio
    from queue import Empty
    calls = []

    async def get_msg(timeout=None):
        calls.append(timeout)
        if timeout is None:
            await asyncio.Event().wait()  # the missed wake-up: never returns
        if len(calls) < 3:
            raise Empty
        return {"msg_type": "execute_reply"}

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(get_msg(), 0.2))
    calls.clear()
    stepped = workbook.poll_in_steps(get_msg, step=0.01)
    assert asyncio.run(asyncio.wait_for(stepped(), 5)) == {"msg_type": "execute_reply"}
    assert calls == [0.01, 0.01, 0.01]
    calls.clear()
    with pytest.raises(Empty):
        asyncio.run(stepped(timeout=7))
    assert calls == [7]
