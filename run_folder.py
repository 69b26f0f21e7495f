"""A run folder on disk (`RunFolder`) and its lifecycle, which `loop.fit` drives: held for one trainer and checked
(`RunFolder.opened`, yielding an `Opening`), started, checkpointed, logged, resumed.

A run folder holds `config.yaml` (written once, when the run starts), `metrics.jsonl` (one JSON row per
logged step and per epoch), `tensorboard/` (the same rows, and every quality-vs-k table written by
`evaluate.write_eval`, as TensorBoard events: `make tensorboard`) and `checkpoint/`, the last good training
state as one unit:
`model.safetensors` (every trainable tensor, named as in the model) and `state.pt` (optimizer, scheduler,
position, the running epoch sums). What the loop guarantees, for phase 1 and phase 2 alike:

- a non-finite loss, gradient or parameter stops training before it is stepped or saved, so the
  checkpoint on disk is always the last good one (and the message says whether there is one);
- a fresh run never replaces a run silently: a folder that holds a checkpoint needs resume or overwrite;
- a checkpoint is written into its own folder, synced to disk, and swapped in with one atomic rename
  of a link, so a crash at any moment leaves either the old checkpoint or the new one, never a mix;
- the weights file keeps the config.yaml it was saved under, so a config.yaml edited or emptied later is named when
  the weights do not fit the model it builds (`RunFolder.config_changes`), and `restore_config` puts it back;
- a read-only run folder (or the folder of its lock file) is refused before anything is written, naming it; the
  run still loads;
- one trainer per run folder: `RunFolder.exclusive` holds a lock file beside the folder. Both phases' training
  refuse a folder another process trains (command line, Python, torchrun's rank 0); `train.ensure_trained`
  waits instead, so two notebooks or two JupyterLab tabs asking for the same phase-1 run train it once;
- resume is exact: the randomness of step s is drawn from a generator seeded by (seed, rank, s), the
  batches of an epoch are a function of (seed, epoch), and metrics rows after the checkpoint are dropped,
  so `metrics.jsonl` reads as one uninterrupted run; a resume that cannot be exact (another config,
  another number of epochs, which the cosine schedule depends on) is refused. metrics.jsonl is the source of
  truth; the events a resumed run writes again are opened with TensorBoard's purge step (the first step after
  the checkpoint), so TensorBoard drops the earlier events from that step on and shows each step once.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import yaml

from config import atomic_write, check_writable, make_folder, state_mismatch


CHECKPOINT = "checkpoint"  # a link to the newest complete checkpoint folder, swapped atomically
# the names of what save() writes, and nothing else of the folder is ever deleted: a user's checkpoint-best/ or .tmp/
CHECKPOINT_FOLDER = re.compile(rf"{CHECKPOINT}-\d{{8}}")
TEMPORARY = re.compile(r"\..+\.tmp\d+(-copy)?")
CHECKPOINT_FILES = {"model.safetensors", "state.pt"}  # what a checkpoint folder holds
# safetensors' save_file writes .tmpXXXXXX beside its target, then renames it: a save killed there by a version that
# wrote checkpoint-<step>/ in place (before saves were staged under a temporary name) left one inside
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")
# the other files a run writes: a folder holding anything else is not a run, and nothing of it is ever deleted
RUN_FILES = {"config.yaml", "metrics.jsonl", "eval.json", "leakage.csv", "information.csv", "confusion.csv",
             "caption_eval.json", "caption_eval_val.json"}
RUN_FOLDERS = {"tokenizer"}  # a phase-2 run's built-in decoder's tokenizer (captioner.MultimodalLLM.fit_vocabulary)
TENSORBOARD = "tensorboard"  # the event files: training rows at its top, each evaluation's table in a folder of its own


# the run locks (RunFolder.exclusive) each thread holds, so that the thread may take one again (flock refuses a
# second open file of the lock even in the process that holds it); another thread of the process waits
HELD_LOCKS = threading.local()


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested config dicts as one level of "section.key" entries, so a message names the exact key."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "encoders":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


class RunFolder:
    """config.yaml + metrics.jsonl + checkpoint/ of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, main: bool = True, defaults: dict | None = None):
        """`defaults`: the config's field defaults. A config.yaml written before a field existed lacks it; it
        is read as the default (a field is only ever added with a default that keeps the old behaviour)."""
        self.path, self.main = Path(path), main  # only the main process of a torchrun job writes
        self.defaults = flatten(defaults or {})
        self.events, self.purge_step = None, None  # the TensorBoard writer, opened at the first row logged

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path | None:
        """The folder of the last complete checkpoint, or None. A run copied with its links dereferenced (cp -rL,
        shutil.copytree, scp -r, a zip) has a plain `checkpoint/` folder instead of the link: that folder is it."""
        link = self.path / CHECKPOINT
        if link.is_symlink():  # save() points it at a folder beside it; one elsewhere is another run's
            target = link.resolve()
            return target if target.is_dir() and target.parent == self.path.resolve() else None
        return link if link.is_dir() and {child.name for child in link.iterdir()} == CHECKPOINT_FILES else None

    def saved_config(self) -> dict:
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{self.config_path} is not valid YAML ({err}); restore it or start a new "
                             "output_dir") from err

    def check_same_config(self, config: dict, ignore: Iterable[str] = ()):
        """Refuse to continue a run with a config that differs in anything that changes training."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} holds a checkpoint but no config.yaml; it cannot be resumed. "
                                    "Start a new output_dir, or pass --overwrite to replace it")
        saved, mine, ignore = {**self.defaults, **flatten(self.saved_config())}, flatten(config), set(ignore)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k not in ignore and saved.get(k) != v}
        if diff:
            hint = ""
            if any(k.split(".")[-1] == "epochs" for k in diff):
                hint = (" The learning-rate schedule is a function of the total number of steps, so a run cannot "
                        "be extended or shortened on resume: train a new run with the epochs you want.")
            raise ValueError(f"cannot resume {self.path}: it was trained with another config; differences "
                             f"(saved, requested): {diff}.{hint} Resume with the saved config.yaml, or use a new "
                             "output_dir")

    def check_start(self, config: dict, resume: bool, overwrite: bool = False, ignore: Iterable[str] = ()):
        """Raise unless the run can start: resuming needs a checkpoint of the same config, a fresh run
        needs a folder without a checkpoint (or `overwrite`). Writes nothing. In a torchrun job rank 0 checks and
        every rank raises what it found: the other ranks would read a folder rank 0 is writing, and a refusal on
        one rank alone would leave the others waiting for it in their first all-reduce."""
        found = None
        if self.main:
            try:
                self._check_start(config, resume, overwrite, ignore)
            except (OSError, ValueError) as err:
                found = err
        if torch.distributed.is_initialized():  # every rank of the job calls this, as it trains the same run
            shared = [found]
            torch.distributed.broadcast_object_list(shared, src=0)
            found = shared[0]
        if found is not None:
            raise found

    def _check_start(self, config: dict, resume: bool, overwrite: bool, ignore: Iterable[str]):
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"output_dir {self.path} is a file, not a folder; choose another --output_dir")
        if resume:
            if self.checkpoint is None:
                raise FileNotFoundError(f"nothing to resume in {self.path} (no checkpoint{self.link_elsewhere()}); "
                                        "drop --resume to start a fresh run")
            self.check_same_config(config, ignore)
        elif self.checkpoint is not None and not overwrite:
            raise FileExistsError(f"{self.path} already holds a run (a checkpoint at step "
                                  f"{self.checkpoint_step()}); to continue it pass --resume, to keep it choose "
                                  "a new --output_dir, to replace it pass --overwrite")
        elif (self.path / "eval.json").is_file() and not overwrite:  # results kept without their weights
            raise FileExistsError(f"{self.path} holds the results of a run (eval.json) without its checkpoint; to "
                                  "keep them choose a new --output_dir, to replace them pass --overwrite")
        foreign = self.foreign_entries()
        if foreign and not resume:
            raise FileExistsError(f"{self.path} is not empty and is not a run of this kind: it holds {foreign}, "
                                  f"which this kind of run does not write{self.other_kind(foreign)}, so a run there is "
                                  "refused (--overwrite too) and nothing in it was touched; choose a new --output_dir "
                                  "or move those away")

    def other_kind(self, foreign: list[str]) -> str:
        """For a refusal: that config.yaml, among `foreign`, is another run's (phase 1 and phase 2 keep to folders of
        their own), naming keys this kind's config has not."""
        extra = self.config_keys_not_ours() if "config.yaml" in foreign else None
        return (f" (its config.yaml has keys this kind's config has not, {extra[:3]}: it is another kind of run's, "
                "phase 2's for a phase-1 run or phase 1's for a phase-2 run, or another program's)") if extra else ""

    def foreign_entries(self) -> list[str]:
        """What in the folder this project did not write: anything but the `checkpoint` link, checkpoint folders
        holding only CHECKPOINT_FILES (or an older version's killed write, SAFETENSORS_TEMPORARY), RUN_FILES
        (config.yaml only when its keys are this run kind's), and temporary files. A `checkpoint` folder is ours
        when it is a complete checkpoint (a dereferenced copy)."""
        if not self.path.is_dir():
            return []
        foreign = []
        for entry in sorted(self.path.iterdir()):
            name, plain = entry.name, not entry.is_symlink()
            own_link = entry.is_symlink() and "/" not in os.readlink(entry)  # save() links a folder beside it
            if name == CHECKPOINT and (own_link or entry == self.checkpoint) or TEMPORARY.fullmatch(name):
                continue
            if CHECKPOINT_FOLDER.fullmatch(name) and plain and entry.is_dir() and all(
                    child.name in CHECKPOINT_FILES or SAFETENSORS_TEMPORARY.fullmatch(child.name)
                    for child in entry.iterdir()):
                continue
            if name in RUN_FILES and plain and entry.is_file() and (name != "config.yaml" or self.own_config()):
                continue
            if name in RUN_FOLDERS and plain and entry.is_dir():
                continue
            if name == TENSORBOARD and plain and entry.is_dir() and all(
                    child.name.startswith("events.out.tfevents.") for child in entry.rglob("*") if child.is_file()):
                continue
            foreign.append(name + ("/" if entry.is_dir() else ""))
        return foreign

    def config_keys_not_ours(self) -> list[str] | None:
        """The keys of config.yaml this run kind's config has not ([]: it reads as this kind's), None when it is not
        a YAML mapping."""
        try:
            saved = yaml.safe_load(self.config_path.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None
        if not isinstance(saved, dict):
            return None
        return sorted(set(flatten(saved)) - set(self.defaults)) if self.defaults else []

    def own_config(self) -> bool:
        """Whether config.yaml reads as a config of this run kind: YAML whose keys are all its fields."""
        return self.config_keys_not_ours() == []

    @contextlib.contextmanager
    def opened(self, config: dict, resume: bool, overwrite: bool = False, ignore: Iterable[str] = ()):
        """The folder held for one trainer (`exclusive`, refusing at once while another process trains it) and checked
        for this run (`check_start`), nothing written yet: yields the `Opening` that `fit` starts, so a run its own
        inputs stop (data, sizes) leaves the folder as it was."""
        with self.exclusive(wait=False):
            self.check_start(config, resume, overwrite, ignore)
            yield Opening(self, config, resume, overwrite, tuple(ignore))

    def start(self, config: dict, resume: bool, overwrite: bool = False, ignore: Iterable[str] = ()):
        """Open the folder for a fresh run (refusing to replace one) or for resuming (checking the config)."""
        self.check_start(config, resume, overwrite, ignore)
        if self.main and self.path.is_dir():
            check_writable(self.path, "the run folder", self.read_only_fix())
        self.clean_leftovers()
        if not resume and self.main:
            # no checkpoint, or the user asked to replace it: nothing trained is lost
            for name in (CHECKPOINT, "config.yaml", "metrics.jsonl", "eval.json", "caption_eval.json", TENSORBOARD):
                target = self.path / name
                if target.is_symlink() or target.is_file():
                    target.unlink()
                elif target.is_dir():  # a dereferenced copy's checkpoint, which check_start let --overwrite replace
                    shutil.rmtree(target)
            self.clean_leftovers(keep_current=False)
            make_folder(self.path, "output_dir")
            atomic_write(self.config_path, lambda tmp: tmp.write_text(yaml.safe_dump(config, sort_keys=False)))

    def read_only_fix(self) -> str:
        return ("A trained run still loads from a read-only folder (phase1.load_aligner); to "
                f"train, resume or overwrite it, make the folder writable, or copy the run (cp -a {self.path} NEW) "
                "and pass --output_dir NEW")

    def clean_leftovers(self, keep_current: bool = True):
        """Checkpoint folders and temporary files a crash left behind (never the current checkpoint)."""
        if not self.main or not self.path.is_dir():
            return
        current = self.checkpoint if keep_current else None
        for entry in self.path.iterdir():
            if CHECKPOINT_FOLDER.fullmatch(entry.name) and entry.is_dir() and entry.resolve() != current:
                shutil.rmtree(entry, ignore_errors=True)
            elif TEMPORARY.fullmatch(entry.name):
                entry.unlink(missing_ok=True) if not entry.is_dir() or entry.is_symlink() else shutil.rmtree(entry)

    def trained(self, epochs: int) -> bool:
        """Whether all `epochs` are trained and the checkpoint holds the last one's weights (its evaluation may
        still be running in the process that trained it). The checkpoint's own position says so, not metrics.jsonl,
        which a user may have cut or deleted."""
        if self.checkpoint is None:
            return False
        where = self.position()
        return where["epoch"] >= epochs and where["batch_in_epoch"] == 0

    def position(self) -> dict:
        """Where the checkpoint stands in training (epoch, batch_in_epoch, step). Read once per checkpoint: make demo
        and ensure_trained poll it every second while another process trains, and unpickling the optimizer's
        state to get it took 0.1 s of CPU from the training beside them."""
        state = self._folder() / "state.pt"
        stat = state.stat()  # a checkpoint folder is written once, under a new name: its file's identity is enough
        return dict(_position(str(state.resolve()), stat.st_mtime_ns, stat.st_size))  # a copy: the cache's stays

    def weights_digest(self) -> str:
        """The sha256 of the checkpoint's weights file: what a run built on this one records of it, so that it
        notices when these weights are retrained or replaced."""
        digest = hashlib.sha256()
        with open(self._folder() / "model.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @contextlib.contextmanager
    def exclusive(self, ready: Callable[[], bool] = lambda: False, poll: float = 1.0, wait: bool = True):
        """Hold the run's lock file (`<folder>.lock` beside it, as the feature cache's: never deleted, so every
        process locks the same file) for the block: yields True once held. While another process holds it, waits,
        or yields False as soon as `ready()` is true (say, the weights it trains are final); with `wait=False` it
        refuses at once. A process that holds the lock already (train.ensure_trained around train.train) goes on;
        only the main process of a torchrun job locks, the others write nothing."""
        lock_file = self.path.with_name(self.path.name + ".lock")
        held_here = HELD_LOCKS.__dict__.setdefault("files", set())
        if not self.main or lock_file.resolve() in held_here:
            yield True
            return
        make_folder(self.path.parent, "output_dir")
        check_writable(self.path.parent, f"the folder of the run's lock file {lock_file.name}", self.read_only_fix())
        with open(lock_file, "a") as handle:
            held, told = False, False
            while not held:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                except BlockingIOError:
                    if not wait:
                        raise RuntimeError(f"another process is training {self.path} (it holds {lock_file}); "
                                           "nothing was written: wait for it to finish, or choose another "
                                           "--output_dir") from None
                    if ready():
                        break
                    if not told:
                        print(f"another process is training {self.path}; waiting for it", flush=True)
                        told = True
                    time.sleep(poll)
            if held:
                held_here.add(lock_file.resolve())
            try:
                yield held
            finally:
                if held:
                    held_here.discard(lock_file.resolve())
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def busy(self) -> bool:
        """Whether another process holds the run's lock (`exclusive`): it trains the run, or evaluates it."""
        lock_file = self.path.with_name(self.path.name + ".lock")
        if not lock_file.is_file():
            return False
        with open(lock_file, "a") as handle:
            try:  # a shared lock, let go at once: a trainer asking for the lock meanwhile retries (`poll`)
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def checkpoint_step(self) -> int | None:
        folder = self.checkpoint
        if folder is None or folder.name.startswith(f"{CHECKPOINT}-"):
            return None if folder is None else int(folder.name.rsplit("-", 1)[1])
        from safetensors import SafetensorError, safe_open  # a dereferenced copy: the step its weights were saved at
        try:
            with safe_open(str(folder / "model.safetensors"), "pt") as weights:
                return int(weights.metadata()["step"])
        except (SafetensorError, OSError, KeyError, TypeError) as err:
            raise ValueError(f"{folder / 'model.safetensors'} is damaged or does not say its step ({err!r}); restore "
                             "it, or train again with --overwrite") from err

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict):
        """Write checkpoint-<step>/ completely under a temporary name, sync it, rename it into place, then point
        `checkpoint` at it in one rename. A kill mid-write leaves only the temporary folder (whatever files the
        writers had open in it), which clean_leftovers removes and foreign_entries never counts as foreign."""
        from safetensors.torch import save_file
        folder = self.path / f"{CHECKPOINT}-{step:08d}"
        staging = self.path / f".{folder.name}.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            # the config it was trained under goes with the weights: config.yaml may be edited later (config_changes)
            trained_under = {"config": self.config_path.read_text()} if self.config_path.is_file() else {}
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(staging / "model.safetensors"), metadata={"step": str(step), **trained_under})
            torch.save(state, staging / "state.pt")
            for path in (staging / "model.safetensors", staging / "state.pt", staging):
                _fsync(path)
            shutil.rmtree(folder, ignore_errors=True)  # what an earlier version's killed save left under this name
            os.rename(staging, folder)
        except (OSError, RuntimeError) as err:  # torch.save tells a full disk as a RuntimeError ("file write failed")
            if isinstance(err, RuntimeError) and "writ" not in str(err):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # half a checkpoint is worth nothing and holds the space
            kept = f"the last complete one ({self.checkpoint.name}) is kept" if self.checkpoint else "none came before"
            raise OSError(f"cannot write the checkpoint {folder} ({err}): the disk is full or the folder is not "
                          f"writable; {kept}. Free space (or move the run), then train on with --resume") from err
        link = self.path / f".{CHECKPOINT}.tmp{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        copied = self.path / CHECKPOINT
        if copied.is_dir() and not copied.is_symlink():
            # a dereferenced copy's checkpoint folder: a rename cannot put a link over a folder, so it steps aside
            # first, under its step's name (or as a leftover when that copy exists too) — for the moment between
            # the two renames there is no link, while the new checkpoint is already complete on disk
            aside = self.path / f"{CHECKPOINT}-{self.checkpoint_step():08d}"
            os.rename(copied, aside if not aside.exists() else self.path / f".{CHECKPOINT}.tmp{os.getpid()}-copy")
        os.replace(link, self.path / CHECKPOINT)
        _fsync(self.path)
        self.clean_leftovers()

    def trained_config(self) -> str | None:
        """The config.yaml the checkpoint was saved under (kept in its weights file), or None for a checkpoint saved
        before it was kept there."""
        from safetensors import safe_open
        with safe_open(str(self._folder() / "model.safetensors"), "pt") as weights:
            return (weights.metadata() or {}).get("config")

    def restore_config(self):
        """Write config.yaml back as the checkpoint was saved under it (what config_changes offers)."""
        atomic_write(self.config_path, lambda tmp: tmp.write_text(self.trained_config()))

    def config_changes(self) -> str:
        """Why the checkpoint's weights may not fit the model config.yaml builds, and the fix: config.yaml was edited
        or emptied after the checkpoint was saved, or the model was built from another config."""
        trained = self.trained_config()
        now = self.config_path.read_text() if self.config_path.is_file() else ""
        other = f"it was saved from another model config than the one built: build the model from {self.config_path}"
        if trained is None:
            return (f"{other} (if that file was edited since the run trained, put its model values back: this "
                    "checkpoint was saved before one kept a copy of it)")
        changes = _differences(yaml.safe_load(trained) or {}, yaml.safe_load(now) or {})
        if not changes:
            return other
        what = ("is empty" if not now.strip() else "was edited after the run trained; (trained with, now): "
                f"{ {key: (value, new) for key, value, new in changes[:6]} }")
        return (f"{self.config_path} {what}, so it builds another model than the one trained. Put the trained values "
                "back, or restore the file as the checkpoint keeps it: python -c \"import loop; "
                f"loop.RunFolder({str(self.path)!r}).restore_config()\"")

    def _folder(self) -> Path:
        folder = self.checkpoint
        if folder is None:
            raise FileNotFoundError(f"no checkpoint in {self.path}{self.link_elsewhere()}: the run never finished an "
                                    "epoch, or the folder is not a run; train it (or pass the output_dir of a trained "
                                    "run)")
        return folder

    def link_elsewhere(self) -> str:
        """Why a `checkpoint` link that leads out of the folder is not this run's checkpoint, or ""."""
        link = self.path / CHECKPOINT
        if not link.is_symlink() or link.resolve().parent == self.path.resolve():
            return ""
        return (f", as its checkpoint link leads to {link.resolve()}, outside the run folder, and another run's "
                "weights are never read as this run's")

    def load_weights(self) -> dict[str, torch.Tensor]:
        return load_tensors(self._folder() / "model.safetensors")

    def load_state(self, mmap: bool = False) -> dict:
        """The checkpoint's training state; `mmap`: read only what is used (a position, not the optimizer's moments)."""
        return load_state(self._folder() / "state.pt", mmap)

    # --- metrics.jsonl: appended row by row, truncated to the checkpoint on resume

    def log(self, row: dict):
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.events is None:
                from torch.utils.tensorboard import SummaryWriter  # here: only training writes events
                self.events = SummaryWriter(self.path / TENSORBOARD, purge_step=self.purge_step)
            group = "train" if row["kind"] == "step" else "epoch"  # steps: losses, lr, temperature; epochs: val
            for key, value in row.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self.events.add_scalar(f"{group}/{key}", value, row["step"])
            if row["kind"] == "epoch":
                self.events.flush()

    def close_events(self):
        if self.events is not None:
            self.events.close()
            self.events = None

    def log_table(self, name: str, table):
        """A table with rows k (a quality-vs-k evaluation) as TensorBoard scalars against k, one tag per column,
        in tensorboard/<name>/; an evaluation run again replaces the earlier one's events."""
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter
        folder = self.path / TENSORBOARD / name
        shutil.rmtree(folder, ignore_errors=True)
        with SummaryWriter(folder) as events:
            for column in table.columns:
                for k, value in table[column].items():
                    if isinstance(value, (int, float, np.number)):
                        events.add_scalar(column, value, int(k))

    def rows(self) -> list[dict]:
        """Every complete row (a kill can leave half a line at the end; it is not a row)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a half line, from a kill or a cut: the rows after it are still rows
                continue
        return rows

    def truncate_metrics(self, step: int, epoch: int):
        """Drop rows logged after the checkpoint at `step`, inside `epoch` (where it resumes): the resumed
        run logs them again, so every step and epoch has exactly one row (and TensorBoard, told to purge from
        the next step on, shows each once)."""
        self.purge_step = step + 1
        if self.main:
            rows = [row for row in self.rows()
                    if row["step"] <= step and not (row["kind"] == "epoch" and row["epoch"] >= epoch)]
            lost = sorted(set(range(epoch)) - {row["epoch"] for row in rows if row["kind"] == "epoch"})
            if lost:  # a checkpoint keeps weights and the running epoch's sums, not the losses of epochs before it
                warnings.warn(f"{self.metrics_path} lacks the rows of epochs {lost} (it was cut, edited or deleted); "
                              "they cannot be made again, as the checkpoint keeps no past losses. The weights and the "
                              "rows still there are kept and training goes on; to have every row, train again with "
                              "--overwrite")
            atomic_write(self.metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows)))


@dataclass
class Opening:
    """A run folder held and checked for one run (`RunFolder.opened`), not yet written: `fit` starts it with `config` as
    it is then (phase 2 completes it first: max_new_tokens follows the captions)."""
    folder: RunFolder
    config: dict
    resume: bool
    overwrite: bool = False
    ignore: tuple[str, ...] = ()

    def start(self):
        self.folder.start(self.config, self.resume, self.overwrite, self.ignore)


def _differences(before: dict, after: dict) -> list[tuple[str, object, object]]:
    """(key, before, after) for every flattened key whose value differs."""
    before, after = flatten(before), flatten(after)
    return [(key, before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of named tensors (names, dtypes, shapes, values): the identity of weights in memory, whichever file
    (or none) they came from."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is damaged or truncated ({err}); restore it, or train again with "
                         "--overwrite") from err


@functools.lru_cache(maxsize=16)
def _position(state_file: str, mtime_ns: int, size: int) -> dict:
    """RunFolder.position's read, cached by the file's path, time and size."""
    return load_state(Path(state_file), mmap=True)["position"]


def load_state(path: Path, mmap: bool = False) -> dict:
    """Training state: tensors and plain containers only (weights_only=True never runs pickled code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # what a damaged file raises
        raise ValueError(f"{path} is damaged or truncated ({type(err).__name__}: {err}); restore it, or "
                         "train again with --overwrite") from err


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: the trainable parameters, and the tensors a model fits to data before training
    and keeps fixed, if it names them in `fitted_tensors()` (phase 2's token statistics)."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return tensors | (model.fitted_tensors() if hasattr(model, "fitted_tensors") else {})


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], run: RunFolder):
    """Load exactly the checkpoint's tensors (of `run`): a missing, extra or reshaped tensor is an error, not a skip."""
    if hasattr(model, "complete_state"):  # tensors an older version of the model did not have yet, and room for
        tensors = model.complete_state(tensors)  # fitted ones the model makes only once they are fitted
    own = checkpoint_tensors(model)
    source = run.checkpoint / "model.safetensors"
    mismatch = state_mismatch(own, tensors)
    if mismatch:
        raise ValueError(f"{source} does not fit the model built: {mismatch}; {run.config_changes()}")
    broken = [name for name, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:  # training never saves one (fit's guard): the file was damaged or written by something else
        raise ValueError(f"{source} holds NaN or infinite values in {broken[:5]}; it was damaged after saving or "
                         "written by another program: restore it, or train again with --overwrite")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
