"""Every notebook runs top to bottom in smoke mode, in order, in one run folder (as `make demo` runs them),
and every committed .ipynb is exactly its jupytext .py twin without outputs."""
import json

import jupytext
import nbformat
import pytest

import workbook

NOTEBOOKS = workbook.notebook_paths()


def test_there_are_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_and_has_no_outputs(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `make sync`"
    assert ipynb.read_text() == jupytext.writes(workbook.to_notebook(py), fmt="ipynb"), \
        f"{ipynb.name} differs from {py.name}: run `make sync`"
    nb = nbformat.read(ipynb, as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count")
               for cell in nb.cells if cell.cell_type == "code")
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with a paragraph saying what it shows"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke-run")


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(py, run_dir):
    executed = workbook.execute(py, run_dir, smoke=True)
    nb = nbformat.read(executed, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    prefix = py.stem[:2]
    figures = list((run_dir / "figures").glob(f"{prefix}_*.png"))
    assert figures, f"{py.name} saved no figure"
    assert all(f.stat().st_size > 5_000 for f in figures), "an empty-looking figure was saved"
    numbers = json.loads((run_dir / "numbers.json").read_text()) if (run_dir / "numbers.json").exists() else {}
    assert any(section.startswith(prefix) for section in numbers), f"{py.name} recorded no key numbers"


def test_report_collects_numbers_and_figures(run_dir):
    report = workbook.write_report(run_dir, {"01_data_and_encoders": 1.0}, smoke=True).read_text()
    assert "(smoke mode)" in report and "![" in report and "| quantity | value |" in report


def test_rerunning_one_notebook_keeps_the_numbers_of_the_others(tmp_path, monkeypatch):
    (tmp_path / "numbers.json").write_text(json.dumps({"01 data": {"a": 1}, "02 phase 1": {"b": 2, "stale": 0}}))
    (tmp_path / "timings.json").write_text(json.dumps({"01_data_and_encoders": 60.0}))

    def fake_execute(path, out_dir, smoke):  # what a notebook does: record its own section
        numbers = json.loads((out_dir / "numbers.json").read_text())
        (out_dir / "numbers.json").write_text(json.dumps({**numbers, "02 phase 1": {"b": 3}}))

    monkeypatch.setattr(workbook, "execute", fake_execute)
    report = workbook.run(tmp_path, smoke=True, only=["02"]).read_text()
    assert json.loads((tmp_path / "numbers.json").read_text()) == {"01 data": {"a": 1}, "02 phase 1": {"b": 3}}
    assert "| 01_data_and_encoders | 1.0 |" in report and "02_phase1_training" in report
