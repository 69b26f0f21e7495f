"""The notebooks' side of the workbook: their settings, one notebook executed, what they show collected.

    python workbook.py --sync                                  # .py files as JupyterLab saves them, .ipynb twins
    python workbook.py --execute notebooks/01_*.py --out DIR   # one notebook (make demo runs them all: demo.py)

Notebooks live in notebooks/ as jupytext percent-format `.py` files: the only tracked source, with no
metadata header, so a diff shows code and prose only. The `.ipynb` twins are untracked working copies
(git ignores them) that `--sync` creates for JupyterLab; notebooks/jupytext.toml pairs the two and filters
all metadata, so saving in JupyterLab writes outputs into the `.ipynb` and only code and prose into the
`.py`. Inside a notebook, `start()` says whether this is a smoke run and where the run folder is;
`save_figure` and `record` put figures and key numbers there, and `report.md` is written from them.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import plots
from config import make_folder
from results import measured_on

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
SMOKE_ENV, RUN_DIR_ENV = "FLEXALIGN_SMOKE", "FLEXALIGN_RUN_DIR"
# The config overrides of a smoke run, by what they shrink; every notebook uses the same, so runs are shared
# between notebooks.
SMOKE_DATA = {"n_train": 256, "n_val": 64, "n_test": 128}
# four registers, two shared (the tests' tiny model): every kind of token is there, and the leakage probes and the
# information map, most of a smoke run's time, have a fifth of the prefixes and tokens of the default's sixteen
SMOKE_PHASE1 = {**SMOKE_DATA, "epochs": 2, "batch_size": 64, "model.n_registers": 4, "model.n_shared": 2}
# max_new_tokens stays the config's: a shorter limit cuts the longest captions off (and warns that it does)
SMOKE_PHASE2 = {"epochs": 1, "min_steps": 0, "warmup_steps": 2}


def settings() -> tuple[bool, Path]:
    """(smoke, run_dir) for the notebook being executed; interactive sessions write to runs/lab, or to
    runs/lab-smoke in smoke mode (tiny runs must never be resumed or reused by a full-size session).

    Also moves to the repository root, so the relative paths of configs (cache/, runs/) mean the same
    in JupyterLab (which starts kernels in notebooks/) as in `make demo`."""
    os.chdir(ROOT)
    smoke = os.environ.get(SMOKE_ENV, "0") == "1"
    run_dir = Path(os.environ.get(RUN_DIR_ENV, ROOT / "runs" / ("lab-smoke" if smoke else "lab")))
    run_dir.mkdir(parents=True, exist_ok=True)
    return smoke, run_dir


def start() -> tuple[bool, Path]:
    """A notebook's first call: `settings()`, tables showing numbers at 3 significant digits (plots.significant),
    and in smoke mode a visible note that its numbers mean nothing."""
    import pandas as pd
    pd.set_option("display.float_format", plots.significant)
    smoke, run_dir = settings()
    if smoke:
        from IPython.display import HTML, display
        display(HTML(f"<div style='border:2px solid #c0392b;padding:6px 10px;background:#fdecea'><b>Smoke mode</b> "
                     f"({SMOKE_ENV}=1): tiny data and one or two epochs, only to check that every cell runs. "
                     "Captions, recalls and probes are at chance here; the numbers are not meaningful. Results "
                     "marked <i>reference</i> are full-size runs shipped in docs/, not this run's. "
                     f"Run folder: <code>{run_dir}</code></div>"))
    return smoke, run_dir


def smoke_sizes(sizes: dict) -> dict:
    """`sizes` (SMOKE_DATA, SMOKE_PHASE1 or SMOKE_PHASE2) in smoke mode, {} in a full run: a notebook's config
    overrides."""
    return sizes if settings()[0] else {}


def save_figure(fig, name: str) -> Path:
    """Save a figure as `<run_dir>/figures/<name>.png` and return the path."""
    path = settings()[1] / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plots.png(fig))
    return path


def record(section: str, **numbers) -> dict:
    """Add key numbers of a notebook to `<run_dir>/numbers.json`; report.md is built from them."""
    path = settings()[1] / "numbers.json"
    with open(path.with_name(".numbers.lock"), "w") as lock:  # notebooks side by side record at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(section, {}).update({k: _plain(v) for k, v in numbers.items()})
        path.write_text(json.dumps(data, indent=1))
    return data[section]


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float):
        return round(value, 4)
    return value


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


# What the tracked `.py` files hold: cells only. The same filters are in notebooks/jupytext.toml, which
# JupyterLab's jupytext reads when it saves a paired notebook, so both write identical files.
PY_FORMAT = {"extension": ".py", "format_name": "percent", "notebook_metadata_filter": "-all",
             "cell_metadata_filter": "-all"}
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def to_notebook(py_path: Path):
    """The jupytext `.py` file as an nbformat notebook (the `.py` file is the source of truth)."""
    import jupytext
    nb = jupytext.read(py_path)
    nb.metadata = {"kernelspec": KERNELSPEC}  # JupyterLab opens it on the project kernel without asking
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # nbformat draws random ids; fixed ones keep executed copies comparable
    return nb


def canonical_py(py_path: Path) -> str:
    """The text JupyterLab's jupytext writes for this notebook: cells, no header, no cell metadata."""
    import jupytext
    return jupytext.writes(to_notebook(py_path), fmt=PY_FORMAT)


def sync_notebooks() -> list[Path]:
    """Bring each `.py` to its canonical form and create its `.ipynb` working copy where missing (an
    existing one keeps its outputs; jupytext takes the cells from whichever twin is newer). Returns the
    files written."""
    import jupytext
    written = []
    for py in notebook_paths():
        text = canonical_py(py)
        if py.read_text() != text:
            py.write_text(text)
            written.append(py)
        ipynb = py.with_suffix(".ipynb")
        if not ipynb.exists():
            ipynb.write_text(jupytext.writes(to_notebook(py), fmt="ipynb"))
            written.append(ipynb)
    return written


def check_notebook(path: Path):
    """Refuse, naming the notebooks there are, a path that is no notebook of the workbook (a jupytext .py file)."""
    names = [p.relative_to(ROOT).as_posix() for p in notebook_paths()]
    if not path.is_file():
        raise FileNotFoundError(f"--execute {path}: no such file; the notebooks are {names}")
    if path.suffix != ".py" or "# %%" not in path.read_text(errors="replace"):
        raise ValueError(f"--execute {path} is not a notebook: the workbook's are jupytext .py files of `# %%` "
                         f"cells, {names}")


def execute(py_path: Path, out_dir: Path, smoke: bool) -> Path:
    """Execute one notebook with the repo root as working directory; write the executed copy. No cell has a
    time limit (a training cell on a slow machine must not be killed); a dead kernel is noticed within seconds
    (nbclient polls it), and output that never arrives after a cell's reply fails after a minute, not never."""
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config
    nb = to_notebook(py_path)
    env = {SMOKE_ENV: "1" if smoke else "0", RUN_DIR_ENV: str(out_dir.resolve())}
    os.environ.update(env)  # the kernel inherits the environment of this process
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # the kernel talks to this process over Unix sockets, as `make lab`'s do: no "Kernel is running over TCP without
    # encryption" warning at each start, and no other user can connect. Their paths are named here, in a folder of
    # this process's own: unnamed they are kernel-ipc-N in the working directory, and two notebooks starting side by
    # side took the same N (each kernel then read the other's messages: "Invalid Signature")
    sockets = tempfile.mkdtemp(prefix="flexalign-kernel-")
    client = NotebookClient(nb, timeout=None, iopub_timeout=60, raise_on_iopub_timeout=True, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}},
                            config=Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets}/kernel"}}))

    def shell_polls_in_steps(**_):
        # With no cell time limit nbclient waits for a cell's reply in one unbounded poll of the shell socket, and
        # when the cell shows widgets that poll can miss the reply and wait for ever (nbclient issue 312; seen here
        # once in notebook 04's slider cell under `make test`: the kernel idle, the test hung for minutes)
        client.kc.shell_channel.get_msg = poll_in_steps(client.kc.shell_channel.get_msg)

    client.on_notebook_start = shell_polls_in_steps
    closed, handle_comm_msg = set(), client.handle_comm_msg

    def remember_closed_widgets(outs, msg, cell_index):
        if msg["msg_type"] == "comm_close":
            closed.add(msg["content"]["comm_id"])
        return handle_comm_msg(outs, msg, cell_index)

    client.handle_comm_msg = remember_closed_widgets
    out_path = out_dir / py_path.with_suffix(".ipynb").name
    try:
        client.execute()
    finally:  # an executed copy is written even on failure, so the error is visible in context
        settle_widgets(nb, closed)
        nbformat.write(nb, out_path)
        shutil.rmtree(sockets, ignore_errors=True)
    return out_path


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def settle_widgets(nb, closed: set[str]):
    """Make the executed copy show what the live notebook showed at its end. A widget output keeps, as its text
    (what JupyterLab shows of a saved notebook), the widget's first frame: every progress bar read "0%|". So the
    outputs of widgets the kernel closed are removed with their saved state (a live notebook removes such a widget,
    every `leave=False` bar once done: dozens in notebook 04's phase-2 cell), a progress bar left on screen
    gets its last frame as its text ("phase 2 · captioning: 100%|██████████| 744/744 [02:15<00:00, ...]"), and
    every other widget becomes its `static_outputs`. The saved state keeps only the models of the widgets still
    shown: not those closed or turned into static outputs, nor those whose output a cell cleared without closing
    them (a bar under clear_output: notebook 03 left about twenty)."""
    import html
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})

    def last_frame(model_id: str) -> str | None:  # tqdm's notebook bar: HBox(HTML, FloatProgress, HTML)
        children = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in state.get(model_id, {}).get("state", {}).get("children", [])]
        if [c.get("model_name") for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
            return None
        left, bar, right = (c["state"] for c in children)
        filled = round(10 * bar.get("value", 0) / bar["max"]) if bar.get("max") else 0
        text = html.unescape(f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}")
        return text.replace("\u2007", " ")

    for cell in nb.cells:
        if "outputs" not in cell:
            continue
        shown = []
        for output in cell.outputs:
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                shown.append(output)
            elif view["model_id"] in closed:
                continue
            elif frame := last_frame(view["model_id"]):
                output["data"]["text/plain"] = frame
                shown.append(output)
            else:
                shown += static_outputs(view["model_id"], state)
        cell.outputs = shown
    kept = set()
    views = [o["data"][WIDGET_VIEW]["model_id"] for c in nb.cells for o in c.get("outputs", [])
             if WIDGET_VIEW in o.get("data", {})]
    while views:
        model_id = views.pop()
        if model_id in state and model_id not in kept:
            kept.add(model_id)
            views += _named_models(state[model_id])
    for model_id in set(state) - kept:
        del state[model_id]


def _named_models(model: dict) -> list[str]:
    """The ids of the widget models that a saved model's state names: its children, layout and style."""
    return [ref.removeprefix("IPY_MODEL_") for value in model.get("state", {}).values()
            for ref in (value if isinstance(value, list) else [value])
            if isinstance(ref, str) and ref.startswith("IPY_MODEL_")]


def static_outputs(model_id: str, state: dict) -> list:
    """A widget's last state as ordinary outputs, which JupyterLab shows in a notebook opened without its kernel
    (an executed notebook is untrusted, and JupyterLab renders no widget view there, only the text repr
    "VBox(children=(..."): a line with each control's value, each Image widget's picture, each HTML widget's HTML
    (notebook 04's k table), each Output widget's outputs."""
    import nbformat
    controls, rich = [], []

    def walk(model_id: str):
        model = state.get(model_id, {})
        values = model.get("state", {})
        if model.get("model_name") == "ImageModel":
            picture = [b["data"] for b in model.get("buffers", []) if b["path"] == ["value"]]
            rich.extend(nbformat.v4.new_output("display_data", data={f"image/{values['format']}": data})
                        for data in picture)
        elif model.get("model_name") == "OutputModel":
            rich.extend(nbformat.from_dict(o) for o in values.get("outputs", []))
        elif model.get("model_name") == "HTMLModel" and values.get("value"):
            rich.append(nbformat.v4.new_output("display_data", data={"text/html": values["value"]}))
        elif values.get("description") and ("value" in values or "index" in values):
            labels = values.get("_options_labels")
            controls.append(f"{values['description']} = {labels[values['index']] if labels else values['value']}")
        for child in _named_models(model):
            walk(child)

    walk(model_id)
    if controls:
        line = ", ".join(controls) + " (the widget's last state; run the notebook to change it)"
        rich.insert(0, nbformat.v4.new_output("display_data", data={"text/plain": line}))
    return rich


def poll_in_steps(get_msg, step: float = 1.0):
    """An async `get_msg(timeout)` whose unbounded wait (timeout None) is a loop of `step`-second polls, each of
    which sees a message that has arrived; a bounded wait is passed through unchanged."""
    from queue import Empty

    async def get(timeout=None):
        while timeout is None:
            try:
                return await get_msg(timeout=step)
            except Empty:
                continue
        return await get_msg(timeout=timeout)
    return get


def write_report(out_dir: Path, timings: dict[str, float], smoke: bool, wall: float | None = None) -> Path:
    """report.md: each notebook's minutes (and `wall`, the seconds of the whole run, whose notebooks ran side by
    side), its key numbers and its figures."""
    numbers_path = out_dir / "numbers.json"
    numbers = json.loads(numbers_path.read_text()) if numbers_path.exists() else {}
    lines = [f"# FlexAlign workbook run{' (smoke mode)' if smoke else ''}", "",
             "| notebook | minutes |", "|---|---|"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in timings.items()]
    if wall is not None:
        lines += ["", f"The whole run took {wall / 60:.1f} minutes, notebooks side by side as soon as what each reads "
                      f"was there (demo.AFTER), at {measured_on()}."]
    for section, values in numbers.items():
        lines += ["", f"## {section}", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items()]
    figures = sorted((out_dir / "figures").glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", type=Path, metavar="NOTEBOOK",
                        help="execute this one notebook into --out (what demo.run starts for each notebook)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="run folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every cell runs")
    parser.add_argument("--sync", action="store_true",
                        help="only normalise the .py files and create missing .ipynb working copies")
    args = parser.parse_args(argv)
    if args.sync:
        print("\n".join(map(str, sync_notebooks())) or "notebooks already in sync")
    elif args.execute:  # demo.run stops this process with SIGINT, which a shell may ignore in background jobs
        signal.signal(signal.SIGINT, signal.default_int_handler)
        check_notebook(args.execute)
        execute(args.execute, make_folder(args.out, "--out"), args.smoke)
    else:
        parser.error("say --sync, or --execute NOTEBOOK (make demo runs every notebook: demo.py)")


if __name__ == "__main__":
    sys.exit(main())
