"""make demo: every numbered notebook in a process of its own, each as soon as what it reads is there, the cores
shared among those computing.

    python demo.py --out runs/demo            # the full workbook on SynthTouch
    python demo.py --out runs/smoke --smoke   # tiny sizes, for the tests

Sharing the cores is this module's business alone. The research path only takes a thread count: the training
loop asks `threads()` before each step when a notebook hands it `demo.threads`, and the probes fit in as many
processes as torch computes on. `run` tells each notebook its share by writing it into a file whose path the
kernel finds in FLEXALIGN_THREADS_FILE; when a notebook ends, the others take over its cores from their next step.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch
from tqdm.auto import tqdm

import loop
import workbook
from config import atomic_write, make_folder

THREADS_FILE_ENV = "FLEXALIGN_THREADS_FILE"


def threads() -> int:
    """The threads this process may compute on now: what `run` last wrote for this notebook, else (nothing written
    yet, or outside make demo) torch's count as it stands."""
    path = os.environ.get(THREADS_FILE_ENV)
    if path:
        try:
            count = int(Path(path).read_text())
            if count > 0:
                return count
        except (OSError, ValueError):  # not written yet: the next call reads it
            pass
    return torch.get_num_threads()


def code_key() -> str:
    """A hash of every notebook, module and config: a notebook finished under another key must run again."""
    root = workbook.ROOT
    files = sorted([*root.glob("*.py"), *workbook.NOTEBOOKS.glob("*.py"), *(root / "configs").rglob("*.yaml")])
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]


# When each notebook may start. One waits for the notebooks it reads from (01's feature cache, 02's default
# phase-1 run) to be done; those not part of this run (`--only`) are not waited for. Some start before the notebook
# they follow is done, once what they read of it is there (EARLY_START): 02 once 01 has cached the training features
# (01's audit then runs beside phase 1), 04 once 02's weights are final (beside 02's evaluation and 03). 04's kernel
# starts earlier still, once 02 trains that run (holds its lock) and a core is left over: it imports and waits in
# train.ensure_trained on no share of the cores (`may_warm`), so its ~10 s of start-up are off the chain to the end.
# Notebook 05 reads nothing of theirs and starts at once, beside 01: 01 computes on one thread (02 starts beside it
# before it ends), so the other core would otherwise idle through 01's start-up and feature caching. Three notebooks
# then share the two cores from 02's start until 01 ends (phase 1's first epoch took 54 s instead of 34), but 05 is
# done sooner, and with it the stretch in which phase 1 has one core: on fresh clones, make demo took 12.0 minutes
# against 12.6 with 05 waiting for 01. Side by side at one thread each, 02 and 05 get more done than one at a time
# on two threads (05's steps are small products that split badly over threads; phase 1's run its two towers one per
# core, towers.py), so phase 1 has both cores only for its last epochs, once 05 is done.
AFTER = {"02": ("01",), "03": ("02",), "04": ("02",)}
CACHED_SECTION = "01 data and encoders"  # what notebook 01 records right after caching the training features


def features_cached(out_dir: Path) -> bool:
    """Whether notebook 01 has cached the training features: it records their timings (numbers.json) right after."""
    try:
        return CACHED_SECTION in json.loads((out_dir / "numbers.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written (workbook.record): the next poll reads it
        return False


def weights_final(run_dir: Path) -> bool:
    """Whether the phase-1 run in `run_dir` has trained its last epoch (its evaluation may still be running)."""
    run = loop.RunFolder(run_dir)
    return run.config_path.is_file() and run.trained(run.saved_config()["epochs"])


# notebook -> (the notebook it follows, whether what it reads of that one is there, given the run's folder)
EARLY_START = {"02": ("01", features_cached), "04": ("02", lambda out_dir: weights_final(out_dir / "phase1/default"))}
WARM = {"04": "phase1/default"}  # notebook -> the run folder it waits for while its kernel warms (`may_warm`)


def ready(path: Path, out_dir: Path, waiting: set[str]) -> bool:
    """Whether notebook `path` may start, given the notebooks of this run `waiting` to start or running."""
    prefix = path.name[:2]
    early, there = EARLY_START.get(prefix, (None, None))
    for before in AFTER.get(prefix, ()):
        unfinished = any(name.startswith(before) for name in waiting)
        if unfinished and not (before == early and there(out_dir)):
            return False
    return True


def may_warm(path: Path, out_dir: Path) -> bool:
    """Whether a WARM notebook may start its kernel before it is `ready`: once another process trains the run
    folder it reads (holds its lock), so that the notebook waits for those weights instead of training them."""
    run_folder = WARM.get(path.name[:2])
    return run_folder is not None and loop.RunFolder(out_dir / run_folder).busy()


def followed_early(path: Path, pending: list[Path]) -> bool:
    """Whether a notebook of this run yet to start will start beside `path` before `path` is done (EARLY_START)."""
    return any(EARLY_START.get(p.name[:2], (None,))[0] == path.name[:2] for p in pending)


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
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), THREADS_FILE_ENV: str(threads_file)}
    command = [sys.executable, str(Path(workbook.__file__).resolve()), "--execute", str(path), "--out", str(out_dir)]
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
    unknown = [o for o in only or () if not any(p.name.startswith(o) for p in workbook.notebook_paths())]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)} names no notebook; the notebooks are "
                         f"{[p.stem for p in workbook.notebook_paths()]}: give their numbers, e.g. --only 01 04")
    progress_path, key = out_dir / "progress.json", code_key()
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    report = out_dir / "report.md"
    earlier = progress.get("smoke", "(smoke mode)" in report.read_text().split("\n", 1)[0] if report.exists() else None)
    if earlier is not None and earlier != smoke:
        kinds = ("a full run", "a smoke run")
        raise ValueError(f"{out_dir} holds {kinds[earlier]} of the workbook; {kinds[smoke]} there would overwrite its "
                         f"notebooks and mix {kinds[smoke][2:]}'s numbers into its report: choose another --out (e.g. "
                         f"runs/{'smoke' if smoke else 'demo'}), or delete {out_dir} first")
    make_folder(out_dir, "--out")
    paths = [p for p in workbook.notebook_paths() if not only or any(p.name.startswith(o) for o in only)]
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
                    # one that another starts beside before it ends starts on the share it will have then: it reads
                    # no threads file outside training steps (01's audit), and would compute on too many threads
                    share = (max(1, min(threads, cores // 2)) if followed_early(path, pending) else threads) \
                        if path in starting else 1
                    notebooks[pool.submit(run_one, path, share)] = path
            if not notebooks and not failed.is_set():
                raise RuntimeError(f"no notebook can start: {[p.stem for p in pending]} wait for each other; "
                                   "check demo.AFTER")
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
    return workbook.write_report(out_dir, dict(sorted(timings.items())), smoke, wall=time.perf_counter() - started_at)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=workbook.ROOT / "runs" / "demo", help="run folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every cell runs")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 02")
    args = parser.parse_args(argv)
    print(f"report: {run(args.out, args.smoke, args.only)}")


if __name__ == "__main__":
    sys.exit(main())
