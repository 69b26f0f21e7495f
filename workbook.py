"""Runs the numbered notebooks top to bottom and collects what they show.

    python workbook.py --out runs/demo            # the full workbook on SynthTouch
    python workbook.py --out runs/smoke --smoke   # tiny sizes, for the tests

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
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import plots

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
    every other widget becomes its `static_outputs`."""
    import html
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for model_id in closed & set(state):
        del state[model_id]

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


def static_outputs(model_id: str, state: dict) -> list:
    """A widget's last state as ordinary outputs, which JupyterLab shows in a notebook opened without its kernel
    (an executed notebook is untrusted, and JupyterLab renders no widget view there, only the text repr
    "VBox(children=(..."): a line with each control's value, each Image widget's picture, each HTML widget's HTML
    (notebook 04's k table), each Output widget's outputs. The widgets' saved state goes, as nothing shows it any more."""
    import nbformat
    controls, rich = [], []

    def walk(model_id: str):
        model = state.pop(model_id, {})
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
        for value in values.values():  # children, and the layout and style models that only it uses
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and ref.startswith("IPY_MODEL_"):
                    walk(ref.removeprefix("IPY_MODEL_"))

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
        from results import measured_on
        lines += ["", f"The whole run took {wall / 60:.1f} minutes, notebooks side by side as soon as what each reads "
                      f"was there (workbook.AFTER), at {measured_on()}."]
    for section, values in numbers.items():
        lines += ["", f"## {section}", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items()]
    figures = sorted((out_dir / "figures").glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def code_key() -> str:
    """A hash of every notebook, module and config: a notebook finished under another key must run again."""
    files = sorted([*ROOT.glob("*.py"), *NOTEBOOKS.glob("*.py"), *(ROOT / "configs").rglob("*.yaml")])
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]


# When each notebook may start. One waits for the notebooks it reads from (01's feature cache, 02's default
# phase-1 run) to be done; those not part of this run (`--only`) are not waited for. Notebook 04 reads only that
# run's weights, so it starts once they are final (EARLY_START), beside 02's evaluation and 03; its kernel starts
# earlier still, once 02 trains that run (holds its lock) and a core is left over (05 is done): it imports and
# waits in train.ensure_trained on no share of the cores (`may_warm`), so its ~10 s of start-up are off the chain
# to the end (phase 2 began 12 s after the weights were final instead of 24). Notebook 05 reads nothing of theirs
# and starts at once. Side by side at one thread each, 02 and 05 did 1.2x the work of one at a time on two threads
# (docs/measurements.md: the demo 35.9 -> 30.8 minutes). 02 starting beside 01 (the cache has a lock of its own) started phase 1
# 12 s earlier but made its weights final 5-7 s later: three notebooks on two cores slowed 05, and phase 1 has two
# threads only once 05 is done.
AFTER = {"02": ("01",), "03": ("02",), "04": ("02",)}
EARLY_START = {"04": ("02", "phase1/default")}  # notebook -> (the notebook it follows, the run folder it reads)


def ready(path: Path, out_dir: Path, waiting: set[str]) -> bool:
    """Whether notebook `path` may start, given the notebooks of this run `waiting` to start or running."""
    prefix = path.name[:2]
    early, run_folder = EARLY_START.get(prefix, (None, None))
    for before in AFTER.get(prefix, ()):
        unfinished = any(name.startswith(before) for name in waiting)
        if unfinished and not (before == early and weights_final(out_dir / run_folder)):
            return False
    return True


def may_warm(path: Path, out_dir: Path) -> bool:
    """Whether an EARLY_START notebook may start its kernel before it is `ready`: once another process trains the
    run folder it reads (holds its lock), so that the notebook waits for those weights instead of training them."""
    import loop  # here, not at the top: it imports torch, which --sync never needs
    run_folder = EARLY_START.get(path.name[:2], (None, None))[1]
    return run_folder is not None and loop.RunFolder(out_dir / run_folder).busy()


def weights_final(run_dir: Path) -> bool:
    """Whether the phase-1 run in `run_dir` has trained its last epoch (its evaluation may still be running)."""
    import loop  # here, not at the top: it imports torch, which --sync never needs
    run = loop.RunFolder(run_dir)
    return run.config_path.is_file() and run.trained(run.saved_config()["epochs"])


def core_budget() -> int:
    """The threads the workbook may use: OMP_NUM_THREADS when set, else the cores this process may run on."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Children:
    """The notebook processes of a run. Once `interrupt` has sent SIGINT to those running, none starts: without
    the lock, a notebook started in the same instant as Ctrl-C would run on, never signalled."""

    def __init__(self):
        self.lock, self.running, self.interrupted = threading.Lock(), set(), False

    def start(self, command: list[str], env: dict):
        with self.lock:
            if self.interrupted:
                raise KeyboardInterrupt
            child = subprocess.Popen(command, env=env)
            self.running.add(child)
            return child

    def wait(self, child) -> int:
        try:
            return child.wait()
        finally:
            with self.lock:
                self.running.discard(child)

    def interrupt(self):
        with self.lock:
            self.interrupted = True
            for child in self.running:
                child.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C has sent them already


def run_notebook(path: Path, out_dir: Path, smoke: bool, threads: int, children: Children, threads_file: Path):
    """`execute` in a process of its own whose kernel computes on `threads` threads, or on the number last
    written into `threads_file` (read before every training step): notebooks side by side each need their own
    environment. It is one of `children` while it runs, so an interrupted `run` can stop it."""
    from config import THREADS_FILE_ENV  # here, not at the top: config imports torch, which --sync never needs
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), THREADS_FILE_ENV: str(threads_file)}
    command = [sys.executable, str(Path(__file__).resolve()), "--execute", str(path), "--out", str(out_dir)]
    code = children.wait(children.start(command + (["--smoke"] if smoke else []), env))
    if code:
        raise RuntimeError(f"notebook {path.name} stopped (exit code {code}); its executed copy, with the error, is "
                           f"{out_dir / path.with_suffix('.ipynb').name}")


def run(out_dir: Path, smoke: bool = False, only: list[str] | None = None) -> Path:
    """Execute the notebooks (all, or those named by `only`) into out_dir, each as soon as what it reads is there
    (AFTER, EARLY_START), side by side with the cores shared among those running, and write report.md. Numbers
    and timings of notebooks not re-run this time are kept, so `--only 04` refreshes one part of a report.

    An interrupted run continues where it stopped: progress.json lists the notebooks finished so far (with
    the code key), those are skipped, and the one interrupted runs again (its training resumes from its
    checkpoint through train.ensure_trained). A run that completes removes progress.json. When a notebook
    fails, the others running finish (nothing trained is lost) and no other starts."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    from config import atomic_write
    unknown = [o for o in only or () if not any(p.name.startswith(o) for p in notebook_paths())]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)} names no notebook; the notebooks are "
                         f"{[p.stem for p in notebook_paths()]}: give their numbers, e.g. --only 01 04")
    progress_path, key = out_dir / "progress.json", code_key()
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    report = out_dir / "report.md"
    earlier = progress.get("smoke", "(smoke mode)" in report.read_text().split("\n", 1)[0] if report.exists() else None)
    if earlier is not None and earlier != smoke:
        kinds = ("a full run", "a smoke run")
        raise ValueError(f"{out_dir} holds {kinds[earlier]} of the workbook; {kinds[smoke]} there would overwrite its "
                         f"notebooks and mix {kinds[smoke][2:]}'s numbers into its report: choose another --out (e.g. "
                         f"runs/{'smoke' if smoke else 'demo'}), or delete {out_dir} first")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [p for p in notebook_paths() if not only or any(p.name.startswith(o) for o in only)]
    done = set(progress.get("done", [])) if progress.get("key") == key and progress.get("smoke") == smoke else set()
    skipped = [p for p in paths if p.stem in done and (out_dir / p.with_suffix(".ipynb").name).exists()]
    if skipped:
        print(f"continuing an interrupted run: {', '.join(p.stem for p in skipped)} already done "
              f"(delete {progress_path} to run them again)", flush=True)
    paths = [p for p in paths if p not in skipped]
    numbers_path, timings_path = out_dir / "numbers.json", out_dir / "timings.json"
    numbers = json.loads(numbers_path.read_text()) if numbers_path.exists() else {}
    # a notebook's sections start with its number ("02 design lines"); drop those about to be rewritten
    numbers = {section: v for section, v in numbers.items() if not any(section.startswith(p.name[:2]) for p in paths)}
    numbers_path.write_text(json.dumps(numbers, indent=1))
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    cores, lock, failed = core_budget(), threading.Lock(), threading.Event()
    pending, started_at, children = list(paths), time.perf_counter(), Children()
    # every started notebook's threads file; those computing, which share the cores; those warmed, which wait;
    # when each began computing (a warmed one's minutes count from its wake-up, as if it had started then)
    budgets, sharing, warm, began = {}, set(), {}, {}

    def tell(stem: str, threads: int):
        atomic_write(budgets[stem], lambda tmp: tmp.write_text(str(threads)))

    def share_cores() -> int:  # under the lock: the cores split among the notebooks computing, told to each
        threads = max(1, cores // max(1, len(sharing)))
        for stem in sharing:
            tell(stem, threads)
        return threads

    def run_one(path: Path, threads: int):
        try:
            run_notebook(path, out_dir, smoke, threads, children, budgets[path.stem])
        except BaseException:
            failed.set()  # before this notebook's cores are shared out, so nothing starts in between
            raise
        finally:
            with lock:  # the others take over this notebook's cores from their next training step
                budgets.pop(path.stem).unlink(missing_ok=True)
                sharing.discard(path.stem)
                warm.pop(path.stem, None)
                share_cores()
        with lock:
            timings[path.stem] = time.perf_counter() - began[path.stem]
            timings_path.write_text(json.dumps(dict(sorted(timings.items())), indent=1))
            done.add(path.stem)
            progress_path.write_text(json.dumps({"key": key, "smoke": smoke, "done": sorted(done)}))
            bar.update(1)
            bar.write(f"{path.stem}: {timings[path.stem]:.0f} s, starting on {threads} thread(s)")

    bar = tqdm(total=len(paths), desc="notebooks")
    pool, notebooks, errors = ThreadPoolExecutor(max(1, len(paths))), {}, []  # future -> its notebook; failures
    try:
        while notebooks or (pending and not failed.is_set()):
            with lock:
                waiting = {p.stem for p in pending} | {p.stem for p in notebooks.values()}
                woken = [stem for stem, path in warm.items() if ready(path, out_dir, waiting)]
                for stem in woken:  # a warmed notebook's input is there: from its next step it computes on its share
                    warm.pop(stem)
                    sharing.add(stem)
                    began[stem] = time.perf_counter()
                starting = [p for p in pending if not failed.is_set() and ready(p, out_dir, waiting)]
                # warmed while a core is left to them, so that their imports take nothing from a notebook on one thread
                warming = [p for p in pending if not failed.is_set() and p not in starting
                           and len(sharing) < cores and may_warm(p, out_dir)]
                for path in starting + warming:  # every budget first: notebooks starting together start on their share
                    pending.remove(path)
                    budgets[path.stem] = out_dir / ".threads" / path.stem
                sharing.update(path.stem for path in starting)
                threads = share_cores() if starting or woken else 1
                for path in warming:
                    warm[path.stem] = path
                    tell(path.stem, 1)
                for path in starting + warming:
                    began[path.stem] = time.perf_counter()
                    notebooks[pool.submit(run_one, path, threads if path in starting else 1)] = path
            if not notebooks and not failed.is_set():
                raise RuntimeError(f"no notebook can start: {[p.stem for p in pending]} wait for each other; "
                                   "check workbook.AFTER")
            finished, _ = wait(notebooks, timeout=1.0, return_when=FIRST_COMPLETED)  # 1 s: EARLY_START's poll
            for future in finished:
                notebooks.pop(future)
                if future.exception() is not None:  # the others running finish; none starts
                    errors.append(future.exception())
        if errors:
            raise errors[0]
    except KeyboardInterrupt:  # no notebook starts, and the running ones stop now
        children.interrupt()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    progress_path.unlink(missing_ok=True)
    return write_report(out_dir, dict(sorted(timings.items())), smoke, wall=time.perf_counter() - started_at)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="run folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every cell runs")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 02")
    parser.add_argument("--execute", type=Path, metavar="NOTEBOOK",
                        help="execute this one notebook into --out (what run starts for each notebook)")
    parser.add_argument("--sync", action="store_true",
                        help="only normalise the .py files and create missing .ipynb working copies")
    args = parser.parse_args(argv)
    if args.sync:
        print("\n".join(map(str, sync_notebooks())) or "notebooks already in sync")
        return
    if args.execute:  # run stops this process with SIGINT, which a shell may ignore in background jobs
        signal.signal(signal.SIGINT, signal.default_int_handler)
        execute(args.execute, args.out, args.smoke)
        return
    print(f"report: {run(args.out, args.smoke, args.only)}")


if __name__ == "__main__":
    sys.exit(main())
