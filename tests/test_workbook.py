"""How `make demo` runs the notebooks (demo.run): each as soon as what it reads is there, side by side with the
cores shared among those running, a failed notebook letting the others running finish and starting no other,
Ctrl-C stopping every notebook at once."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import demo
import workbook

NAMES = [p.stem for p in workbook.notebook_paths()]


def trained_run(folder: Path, epochs: int = 1):
    """What a phase-1 run folder holds once its last epoch is trained: config, the epoch rows, a checkpoint."""
    import loop
    run = loop.RunFolder(folder)
    run.start({"epochs": epochs}, resume=False)
    for epoch in range(epochs):
        run.log({"kind": "epoch", "step": epoch + 1, "epoch": epoch})
        save_epoch(run, epoch + 1)


def save_epoch(run, epochs_done: int):
    """The checkpoint loop.fit saves after `epochs_done` epochs (one step each)."""
    import torch
    run.save(epochs_done, {"weight": torch.zeros(1)},
             {"position": {"step": epochs_done, "epoch": epochs_done, "batch_in_epoch": 0}})


def wait_for_text(path: Path, text: str, seconds: float = 10) -> str:
    """The content of `path` once it reads `text` (workbook.run polls once a second), or whatever it reads after
    `seconds`."""
    deadline = time.time() + seconds
    while path.read_text() != text and time.time() < deadline:
        time.sleep(0.01)
    return path.read_text()


def test_each_notebook_starts_once_what_it_reads_is_there_and_the_cores_are_shared(tmp_path, monkeypatch):
    """01 and 05 (which reads nothing the others write) start at once, one core each: 02 starts beside them as soon
    as 01 has cached the training features (it records their timings), the three on one thread each. 04 reads only
    02's phase-1 weights: its kernel starts while 02 trains that run (holds its lock) once a core is left over (01
    and 05 are done), on no share of the cores, so 02 is told (through its threads file, which the training loop
    reads before each step) that it may use both; when the weights are final, 04 computes beside 02's evaluation
    and the two share the cores. 03 starts after 02 (its evaluation)."""
    import loop
    events = {name: threading.Event() for name in ("01 started", "01 done", "02 started", "05 done", "04 started",
                                                   "02 saw 04", "02 done")}
    seen = []

    def fake_notebook(path, out_dir, smoke, threads, children, threads_file):
        seen.append((path.stem, threads))
        if path.name.startswith("01"):
            events["01 started"].set()
            assert not events["02 started"].wait(1.5), "02 started before 01 cached the features"
            numbers = out_dir / "numbers.json"
            numbers.write_text(json.dumps({**json.loads(numbers.read_text()), demo.CACHED_SECTION: {}}))
            assert events["02 started"].wait(10), "02 waited for the whole of 01, not for its feature cache"
            events["01 done"].set()
        if path.name.startswith("05"):
            assert events["01 started"].wait(10) and not events["01 done"].is_set(), "05 waited for 01"
            assert events["02 started"].wait(10), "02 did not start beside 01 and 05"
            seen.append(("05 beside 01 and 02", int(threads_file.read_text())))
            events["05 done"].set()
        if path.name.startswith("02"):
            run_dir = out_dir / "phase1" / "default"
            with loop.RunFolder(run_dir).exclusive():  # training phase 1
                events["02 started"].set()
                assert events["04 started"].wait(10), "04's kernel waited for the weights, not for the training"
                seen.append(("02 beside a waiting 04", int(wait_for_text(threads_file, "2"))))
                trained_run(run_dir, epochs=2)  # the weights are final: 04 computes from now on
                seen.append(("02 beside 04", int(wait_for_text(threads_file, "1"))))
                events["02 saw 04"].set()
            events["02 done"].set()
        if path.name.startswith("04"):
            assert events["01 done"].is_set() and events["05 done"].is_set(), "04 warmed while no core was left"
            assert not demo.weights_final(out_dir / "phase1" / "default")
            seen.append(("04 waiting", int(threads_file.read_text())))
            events["04 started"].set()
            assert events["02 saw 04"].wait(10)
            seen.append(("04 computing", int(threads_file.read_text())))
        if path.name.startswith("03"):
            assert events["02 done"].is_set(), "03 started before 02 was done"
        (out_dir / path.with_suffix(".ipynb").name).write_text("{}")

    monkeypatch.setattr(demo, "core_budget", lambda: 2)
    monkeypatch.setattr(demo, "run_notebook", fake_notebook)
    report = demo.run(tmp_path, smoke=True).read_text()
    threads = dict(seen)
    order = [name for name, _ in seen if name in NAMES]
    assert order.index("01_data_and_encoders") < order.index("02_phase1_training") < order.index("04_captioning")
    assert order.index("04_captioning") < order.index("03_prefix_quality")
    assert threads["01_data_and_encoders"] == threads["02_phase1_training"] == threads["05_real_data"] == 1
    assert threads["05 beside 01 and 02"] == 1
    assert threads["04_captioning"] == threads["04 waiting"] == 1
    assert threads["02 beside a waiting 04"] == 2, "a notebook that only waits took a share of the cores"
    assert threads["02 beside 04"] == threads["04 computing"] == 1
    assert all(name in report for name in NAMES) and "side by side" in report
    assert not (tmp_path / "progress.json").exists()


def test_what_a_notebook_waits_for():
    """Only notebooks of this run are waited for (`--only 04` starts at once and trains phase 1 itself when it
    is missing); 04 waits for 02 until 02's run has final weights, and a run still mid-training is not final."""
    folder = Path(__file__).parent / "no-such-run"
    paths = {p.name[:2]: p for p in workbook.notebook_paths()}
    assert demo.ready(paths["04"], folder, {"04_captioning"})
    assert not demo.ready(paths["04"], folder, {"02_phase1_training", "04_captioning"})
    assert not demo.ready(paths["03"], folder, {"02_phase1_training", "03_prefix_quality"})
    assert demo.ready(paths["05"], folder, set(NAMES))  # 05 reads nothing of the others
    assert not demo.ready(paths["02"], folder, set(NAMES))  # 01 builds the feature cache first


def test_notebook_04_warms_its_kernel_only_while_another_process_trains_the_run_it_reads(tmp_path):
    """Warming before that would let 04 take the run's lock first and train phase 1 itself, out of 02's sight and
    on no share of the cores; a folder left by an interrupted run (a checkpoint, nobody training) is no reason."""
    import loop
    paths = {p.name[:2]: p for p in workbook.notebook_paths()}
    run = loop.RunFolder(tmp_path / "phase1" / "default")
    assert not demo.may_warm(paths["04"], tmp_path)
    with run.exclusive():
        assert demo.may_warm(paths["04"], tmp_path)
        assert not demo.may_warm(paths["03"], tmp_path)  # only WARM notebooks are warmed
        trained_run(run.path, epochs=1)
    assert not demo.may_warm(paths["04"], tmp_path)
    with run.exclusive() as held:  # asking whether the run is busy never keeps its trainer out
        assert held


def test_notebook_04_starts_beside_02_once_the_weights_are_final(tmp_path):
    import loop
    run_dir = tmp_path / "phase1" / "default"
    paths = {p.name[:2]: p for p in workbook.notebook_paths()}
    waiting = {"02_phase1_training", "03_prefix_quality", "04_captioning"}
    trained_run(run_dir, epochs=2)
    assert demo.ready(paths["04"], tmp_path, waiting)
    assert not demo.ready(paths["03"], tmp_path, waiting)  # 03 reads 02's evaluation
    save_epoch(loop.RunFolder(run_dir), 1)  # the checkpoint before the last epoch: not final
    assert not demo.ready(paths["04"], tmp_path, waiting)


def test_a_failed_notebook_lets_the_others_running_finish_and_starts_no_other(tmp_path, monkeypatch):
    """05 fails while 01 runs beside it (05 waits for nothing) and 02 waits for 01: 01 finishes, 02 never starts."""
    failed, ran = threading.Event(), []

    def fake_notebook(path, out_dir, smoke, threads, children, threads_file):
        ran.append(path.stem)
        if path.name.startswith("05"):
            failed.set()
            raise RuntimeError("notebook 05_real_data.ipynb stopped")
        assert failed.wait(10)  # 01 is still running when 05 fails ...
        deadline = time.time() + 10  # ... and ends only once 05's failure is through (its thread file gone)
        while (out_dir / ".threads" / "05_real_data").exists() and time.time() < deadline:
            time.sleep(0.01)
        (out_dir / path.with_suffix(".ipynb").name).write_text("{}")

    monkeypatch.setattr(demo, "run_notebook", fake_notebook)
    with pytest.raises(RuntimeError, match="05_real_data"):
        demo.run(tmp_path, smoke=True)
    assert sorted(ran) == ["01_data_and_encoders", "05_real_data"]
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == ["01_data_and_encoders"]


STAND_INS = ("01_first", "05_beside")  # two notebooks that read nothing of each other


def stand_in_notebooks(tmp_path, monkeypatch, seconds: float) -> Path:
    """The workbook's notebooks replaced by two one-cell ones that start together, each writing when it started, its
    process and thread setting, then sleeping `seconds`; returns the run folder (two cores to share)."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in STAND_INS:
        (folder / f"{name}.py").write_text(
            "# %% [markdown]\n# A stand-in notebook.\n\n# %%\nimport json, os, pathlib, time\n"
            f"out = pathlib.Path(os.environ['{workbook.RUN_DIR_ENV}']) / '{name}.json'\n"
            "start = time.time()\n"
            "out.write_text(json.dumps({'start': start, 'pid': os.getpid(), 'threads': os.environ['OMP_NUM_THREADS'],\n"
            f"                           'budget': os.environ['{demo.THREADS_FILE_ENV}']}}))\n"
            f"time.sleep({seconds})\n"
            "out.write_text(json.dumps({**json.loads(out.read_text()), 'end': time.time()}))\n")
    monkeypatch.setattr(workbook, "NOTEBOOKS", folder)
    monkeypatch.setattr(demo, "AFTER", {})  # neither waits for the other, as make demo's 01 and 05
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return tmp_path / "run"


def test_notebooks_side_by_side_run_as_two_processes_each_kernel_on_its_share_of_the_cores(tmp_path, monkeypatch):
    out = stand_in_notebooks(tmp_path, monkeypatch, seconds=3)
    report = demo.run(out, smoke=True).read_text()
    first, beside = (json.loads((out / f"{name}.json").read_text()) for name in STAND_INS)
    assert first["threads"] == beside["threads"] == "1"
    assert first["budget"] != beside["budget"]  # each kernel reads its own thread budget
    assert first["pid"] != beside["pid"]
    # each sleeps 3 s: one after the other they could not overlap at all; side by side they overlap by most of it
    assert min(first["end"], beside["end"]) - max(first["start"], beside["start"]) > 1.5
    assert (out / "01_first.ipynb").is_file() and (out / "05_beside.ipynb").is_file()
    assert "| 01_first |" in report and "| 05_beside |" in report


def test_ctrl_c_stops_every_running_notebook_and_their_kernels(tmp_path, monkeypatch):
    out = stand_in_notebooks(tmp_path, monkeypatch, seconds=120)

    finished = threading.Event()

    def interrupt_once_both_cells_run():
        while not all((out / f"{n}.json").exists() for n in STAND_INS):
            if finished.wait(0.2):
                return  # the run ended without its cells: its own error fails the test, no signal is sent
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in a terminal sends make demo

    # Python's own handler (KeyboardInterrupt), whatever the shell that started the tests set
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt_once_both_cells_run, daemon=True)
    start = time.time()
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            demo.run(out, smoke=True)
    finally:
        finished.set()
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    # the cells sleep 120 s: a run that waited for them instead of stopping them would take that long
    assert time.time() - start < 90
    kernels = [json.loads((out / f"{n}.json").read_text())["pid"] for n in STAND_INS]
    deadline = time.time() + 20  # a kernel shut down by nbclient is gone within seconds

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    while any(map(alive, kernels)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, kernels)), "a notebook's kernel kept running after Ctrl-C"
    progress = out / "progress.json"  # nothing finished, so nothing is skipped next time
    assert not progress.exists() or not json.loads(progress.read_text())["done"]


def test_after_ctrl_c_no_notebook_process_starts(tmp_path):
    """Ctrl-C signals the notebook processes running, and from then on none starts: a notebook started in the same
    instant either is running when the signal goes out (the two share a lock) or is refused."""
    import sys
    children = demo.Children()
    # a notebook process takes SIGINT even when started from a shell that ignores it (workbook.py --execute)
    ready = tmp_path / "ready"
    notebook = (f"import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"open({str(ready)!r}, 'w'); time.sleep(60)")
    running = children.start([sys.executable, "-c", notebook], dict(os.environ))
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:  # its handler in place
        time.sleep(0.05)
    children.interrupt()
    assert children.wait(running) != 0  # stopped by the signal, not after its 60 s
    marker = tmp_path / "started"
    with pytest.raises(KeyboardInterrupt):
        children.start([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], dict(os.environ))
    time.sleep(1)  # time enough for a process that did start to write its file
    assert not marker.exists() and not children.running


def test_notebooks_side_by_side_lose_no_recorded_number(tmp_path, monkeypatch):
    """Two kernels write numbers.json at once (02 and 05 in make demo): each record is read, updated and written
    under a lock, so no section overwrites another's."""
    monkeypatch.setenv(workbook.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(workbook.SMOKE_ENV, "1")
    here = os.getcwd()

    def record_many(notebook: str):
        for i in range(40):
            workbook.record(f"{notebook} section {i}", value=i)

    kernels = [threading.Thread(target=record_many, args=(notebook,)) for notebook in ("02", "05")]
    for kernel in kernels:
        kernel.start()
    for kernel in kernels:
        kernel.join()
    os.chdir(here)  # settings() moves to the repository root, as a notebook needs
    assert len(json.loads((tmp_path / "numbers.json").read_text())) == 80


def test_a_notebook_computes_on_the_share_make_demo_writes(tmp_path, monkeypatch):
    """The kernel side of sharing the cores: `demo.threads()` reads the number last written into the file that
    FLEXALIGN_THREADS_FILE names (torch's count while nothing is written, and outside make demo), and the training
    loop handed it computes each step on that many threads; a loop handed nothing leaves torch's count alone."""
    import argparse

    import torch

    import loop
    before = torch.get_num_threads()
    model = torch.nn.Linear(2, 1)
    hp = argparse.Namespace(epochs=1, lr=1e-3, weight_decay=0.0, warmup_steps=1, grad_clip=1.0, seed=0, log_every=1)
    file, seen = tmp_path / "budget", []

    def loss_fn(step):
        seen.append(torch.get_num_threads())
        file.write_text(str(2 - step % 2))  # make demo telling a new share between two steps
        return model(torch.ones(1, 2)).sum(), {}
    try:
        monkeypatch.setenv(demo.THREADS_FILE_ENV, str(file))
        assert demo.threads() == before  # nothing written yet
        file.write_text("1")
        assert demo.threads() == 1
        loop.fit(model, loss_fn, lambda epoch: [0, 1, 2], 3, hp, threads=demo.threads)
        assert seen == [1, 2, 1]
        loop.fit(model, loss_fn, lambda epoch: [0, 1, 2], 3, hp)
        assert seen[3:] == [1, 1, 1]
        monkeypatch.delenv(demo.THREADS_FILE_ENV)
        assert demo.threads() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_the_executed_copy_shows_what_the_live_notebook_shows_not_every_closed_progress_bar(tmp_path, monkeypatch,
                                                                                             capfd):
    """A `leave=False` bar vanishes from a live notebook once done; in the executed copy it would stay as its first
    frame ("0%|"), dozens of them in notebook 04. Kept: a bar left on screen, showing its last frame. Any other widget
    becomes its last state, which JupyterLab shows without a kernel: its controls' values, its image, its Output
    widget's outputs (not the text `VBox(children=(...`). A bar whose output a cell cleared without closing it
    leaves no saved state: the saved widget state holds only models that the outputs show. The kernel talks over Unix
    sockets: no TCP warning."""
    notebook = tmp_path / "01_bars.py"
    notebook.write_text(
        "# %% [markdown]\n# Bars.\n\n# %%\nfrom IPython.display import clear_output\nfrom tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='cleared, never closed'):\n    pass\nclear_output()\n\n"
        "# %%\nimport io\nimport ipywidgets\nfrom IPython.display import HTML, display\n"
        "from PIL import Image\n"
        "for _ in tqdm(range(3), desc='gone when done', leave=False):\n    pass\n"
        "for _ in tqdm(range(3), desc='left on screen'):\n    pass\n"
        "picture, table = io.BytesIO(), ipywidgets.Output()\nImage.new('RGB', (4, 4)).save(picture, 'png')\n"
        "with table:\n    display(HTML('<table><tr><td>k = 7</td></tr></table>'))\n"
        "ipywidgets.VBox([ipywidgets.IntSlider(value=7, description='k'), ipywidgets.Image(value=picture.getvalue()), "
        "table])\n")
    out = tmp_path / "run"
    out.mkdir()
    for name in (workbook.SMOKE_ENV, workbook.RUN_DIR_ENV, "PYTHONPATH"):  # execute sets them for the kernel
        monkeypatch.setenv(name, os.environ.get(name, ""))
    nb = json.loads(workbook.execute(notebook, out, smoke=True).read_text())
    assert nb["cells"][1]["outputs"] == []
    outputs = nb["cells"][2]["outputs"]
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [o["data"][workbook.WIDGET_VIEW]["model_id"] for c in nb["cells"][1:] for o in c["outputs"]
             if workbook.WIDGET_VIEW in o.get("data", {})]
    reachable = set()
    while shown:  # a shown model, and the models its state names (children, layout, style)
        model_id = shown.pop()
        reachable.add(model_id)
        shown += [ref.removeprefix("IPY_MODEL_") for value in state[model_id]["state"].values()
                  for ref in (value if isinstance(value, list) else [value])
                  if isinstance(ref, str) and ref.startswith("IPY_MODEL_")]
    assert set(state) == reachable
    bar = outputs[0]["data"]
    assert "".join(bar["text/plain"]).startswith("left on screen: 100%|██████████| 3/3 [")  # its last frame
    assert bar[workbook.WIDGET_VIEW]["model_id"] in state  # its saved state is kept
    assert [sorted(o["data"]) for o in outputs[1:]] == [["text/plain"], ["image/png"], ["text/html", "text/plain"]]
    assert "".join(outputs[1]["data"]["text/plain"]).startswith("k = 7 (the widget's last state")
    assert "k = 7" in "".join(outputs[3]["data"]["text/html"])
    assert not any(model["model_name"] in ("VBoxModel", "ImageModel") for model in state.values())
    assert "without encryption" not in capfd.readouterr().err


def test_an_unknown_notebook_name_or_a_smoke_run_into_a_full_run_is_refused(tmp_path, monkeypatch):
    """`--only 09` used to run nothing and exit 0 with an empty report; `--smoke` into a full demo folder rewrote its
    notebooks and put tiny runs' numbers into the full report. Both are refused before anything runs."""
    ran = []
    monkeypatch.setattr(demo, "run_notebook", lambda path, *rest: ran.append(path.stem))
    with pytest.raises(ValueError, match=r"--only 09 names no notebook; the notebooks are \['01_data_and_encoders'"):
        demo.run(tmp_path, smoke=True, only=["01", "09"])
    full = tmp_path / "demo"
    full.mkdir()
    workbook.write_report(full, {}, smoke=False)  # what a finished make demo leaves
    with pytest.raises(ValueError, match=r"demo holds a full run of the workbook; a smoke run there would overwrite"):
        demo.run(full, smoke=True)
    smoke = tmp_path / "smoke"
    smoke.mkdir()
    (smoke / "progress.json").write_text(json.dumps({"key": "k", "smoke": True, "done": []}))  # an interrupted one
    with pytest.raises(ValueError, match=r"smoke holds a smoke run of the workbook; a full run there"):
        demo.run(smoke, smoke=False)
    assert ran == [] and sorted(p.name for p in full.iterdir()) == ["report.md"]
