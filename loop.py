"""The one training loop of both phases, the run folder it owns, and torchrun's ranks (`Distributed`).

    with RunFolder(path).opened(config, resume=...) as opened:
        fit(model, loss_fn, batches, steps_per_epoch, hp, opened)

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

import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm.auto import tqdm

from config import atomic_write, make_folder, state_mismatch

CHECKPOINT = "checkpoint"  # a link to the newest complete checkpoint folder, swapped atomically
# the names of what save() writes, and nothing else of the folder is ever deleted: a user's checkpoint-best/ or .tmp/
CHECKPOINT_FOLDER = re.compile(rf"{CHECKPOINT}-\d{{8}}")
TEMPORARY = re.compile(r"\..+\.tmp\d+(-copy)?")
CHECKPOINT_FILES = {"model.safetensors", "state.pt"}  # what a checkpoint folder holds
# the other files a run writes: a folder holding anything else is not a run, and nothing of it is ever deleted
RUN_FILES = {"config.yaml", "metrics.jsonl", "eval.json", "leakage.csv", "information.csv", "confusion.csv",
             "caption_eval.json", "caption_eval_val.json"}
RUN_FOLDERS = {"tokenizer"}  # a phase-2 run's built-in decoder's tokenizer (captioner.MultimodalLLM.fit_vocabulary)
TENSORBOARD = "tensorboard"  # the event files: training rows at its top, each evaluation's table in a folder of its own


# the run locks (RunFolder.exclusive) each thread holds, so that the thread may take one again (flock refuses a
# second open file of the lock even in the process that holds it); another thread of the process waits
HELD_LOCKS = threading.local()


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss, gradient or parameter; nothing non-finite was saved."""


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
        needs a folder without a checkpoint (or `overwrite`). Writes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"output_dir {self.path} is a file, not a folder; choose another --output_dir")
        if resume:
            if self.checkpoint is None:
                raise FileNotFoundError(f"nothing to resume in {self.path} (no checkpoint); drop --resume to "
                                        "start a fresh run")
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
            raise FileExistsError(f"{self.path} is not empty and is not a FlexAlign run: it holds {foreign}, which "
                                  "this project did not write, so a run there is refused (--overwrite too) and "
                                  "nothing in it was touched; choose a new --output_dir or move those away")

    def foreign_entries(self) -> list[str]:
        """What in the folder this project did not write: anything but the `checkpoint` link, checkpoint folders
        holding only CHECKPOINT_FILES, RUN_FILES (config.yaml only when its keys are this run kind's), and
        temporary files. A `checkpoint` folder is ours when it is a complete checkpoint (a dereferenced copy)."""
        if not self.path.is_dir():
            return []
        foreign = []
        for entry in sorted(self.path.iterdir()):
            name, plain = entry.name, not entry.is_symlink()
            own_link = entry.is_symlink() and "/" not in os.readlink(entry)  # save() links a folder beside it
            if name == CHECKPOINT and (own_link or entry == self.checkpoint) or TEMPORARY.fullmatch(name):
                continue
            if CHECKPOINT_FOLDER.fullmatch(name) and plain and entry.is_dir() and \
                    {child.name for child in entry.iterdir()} <= CHECKPOINT_FILES:
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

    def own_config(self) -> bool:
        """Whether config.yaml reads as a config of this run kind: YAML whose keys are all its fields."""
        try:
            saved = yaml.safe_load(self.config_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            return False
        return isinstance(saved, dict) and (not self.defaults or set(flatten(saved)) <= set(self.defaults))

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
        where = self.load_state(mmap=True)["position"]  # ensure_trained polls it while another process trains
        return where["epoch"] >= epochs and where["batch_in_epoch"] == 0

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
        """Write checkpoint-<step>/ completely, sync it, then point `checkpoint` at it in one rename."""
        from safetensors.torch import save_file
        folder = self.path / f"{CHECKPOINT}-{step:08d}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                      metadata={"step": str(step)})
            torch.save(state, folder / "state.pt")
            for path in (folder / "model.safetensors", folder / "state.pt", folder):
                _fsync(path)
        except (OSError, RuntimeError) as err:  # torch.save tells a full disk as a RuntimeError ("file write failed")
            if isinstance(err, RuntimeError) and "writ" not in str(err):
                raise
            shutil.rmtree(folder, ignore_errors=True)  # half a checkpoint is worth nothing and holds the space
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

    def _folder(self) -> Path:
        folder = self.checkpoint
        if folder is None:
            raise FileNotFoundError(f"no checkpoint in {self.path}: the run never finished an epoch, or the "
                                    "folder is not a run; train it (or pass the output_dir of a trained run)")
        return folder

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


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is damaged or truncated ({err}); restore it, or train again with "
                         "--overwrite") from err


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


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str):
    """Load exactly the checkpoint's tensors: a missing, extra or reshaped tensor is an error, not a skip."""
    own = checkpoint_tensors(model)
    if hasattr(model, "complete_state"):  # tensors an older version of the model did not have yet
        tensors = model.complete_state(tensors)
    mismatch = state_mismatch(own, tensors)
    if mismatch:
        raise ValueError(f"{source} was saved from a different model config: {mismatch}; build the model from "
                         "the config.yaml saved beside it")
    broken = [name for name, value in tensors.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:  # training never saves one (fit's guard): the file was damaged or written by something else
        raise ValueError(f"{source} holds NaN or infinite values in {broken[:5]}; it was damaged after saving or "
                         "written by another program: restore it, or train again with --overwrite")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


# ----------------------------------------------------------------------------------------------
# torchrun

class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.main = self.rank == 0  # the process that writes
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    def local_slice(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share of a global batch (the global batch is the same on every rank)."""
        if len(indices) % self.world:
            multiple = self.world * max(1, len(indices) // self.world)
            raise ValueError(f"batch_size {len(indices)} is not divisible by the {self.world} processes of this "
                             f"torchrun job; use a multiple of {self.world}, e.g. --batch_size {multiple}")
        per = len(indices) // self.world
        return indices[self.rank * per:(self.rank + 1) * per]

    def global_mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """The mean over the whole global batch of a loss each rank holds as a sum `total` of its `count` terms (phase
        2: one a caption token), as one process with the whole batch computes it: a mean per rank, averaged, would
        weigh a token of a rank with shorter captions more. Its value is the global mean on every rank (the loss
        logged); its gradient is this rank's sum over the global count times the number of ranks, which DDP's
        average of the ranks' gradients turns into the global mean's gradient."""
        if self.world == 1:
            return total / count
        sums = torch.stack([total.detach(), torch.tensor(float(count), device=total.device)])
        torch.distributed.all_reduce(sums)
        share = total * self.world / sums[1]
        return share + (sums[0] / sums[1] - share).detach()

    @contextlib.contextmanager
    def main_first(self):
        """The block runs on rank 0 first, then on the other ranks: what it writes (a feature cache) is written once,
        and the others read it."""
        if self.world > 1 and not self.main:
            torch.distributed.barrier()
        yield
        if self.world > 1 and self.main:
            torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Optimisation

def make_optimizer(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW with linear warm-up + cosine decay over `total_steps`. Weight decay applies to weight
    matrices only: never to biases, norms, or the parameters a model names in `no_weight_decay()`
    (registers, positions, queries, embeddings of a direction, the temperature)."""
    skip = set(getattr(model, "no_weight_decay", set)())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name in skip else decay).append(p)
    # fused: one kernel for all parameters (the per-tensor loop cost 11 ms a step on the testbed model, this 2.4)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)

    def schedule(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def epoch_order(n: int, seed: int, epoch: int, block: int = 1) -> np.ndarray:
    """The sample order of an epoch depends only on (seed, epoch, block), so a resumed run sees the same batches.

    block > 1: blocks of `block` consecutive samples come in a shuffled order, each block's samples shuffled
    within it, so an epoch reads a feature file block by block (a cache larger than memory is read in long
    forward runs, never row by row all over the file). block 1 is a plain permutation."""
    rng = np.random.default_rng([seed, epoch])
    if block <= 1:
        return rng.permutation(n)
    return np.concatenate([start + rng.permutation(min(block, n - start)) for start in rng.permutation(range(0, n, block))])


def index_batches(n: int, batch_size: int, seed: int, block: int = 1) -> Callable[[int], list[np.ndarray]]:
    """batches(epoch): the epoch's shuffled sample indices (epoch_order) in batches of `batch_size`, each
    sorted, so it is read in file order (the last partial batch is dropped, so every step has the same size)."""
    def batches(epoch):
        order = epoch_order(n, seed, epoch, block)
        return [np.sort(order[i:i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)]
    return batches


def prefetched(items: Iterable, load: Callable, depth: int = 2):
    """load(item) of each item in order, computed by a background thread up to `depth` items ahead, so reading
    the next batch from disk overlaps the step on this one (file reads and numpy copies release the GIL)."""
    items = iter(items)
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    try:
        pending = collections.deque(pool.submit(load, item) for item in itertools.islice(items, depth))
        while pending:
            value = pending.popleft().result()
            pending.extend(pool.submit(load, item) for item in itertools.islice(items, 1))
            yield value
    finally:  # also when the loop stops early (Ctrl-C, an error): drop what was not started
        pool.shutdown(wait=True, cancel_futures=True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of step `step` on process `rank`: every random draw of a step (nested dropout, flow
    times) is a function of it, so a resumed step draws what it drew before, and each rank of a
    torchrun job draws its own."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX). Without them PyTorch emulates bf16,
    and bf16 autocast makes a step slower, not faster: 10x at the testbed's width and 30x at the seed config's on
    a 2-core AVX2 EPYC (bench/bench_step.py --bf16)."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


MAX_LR = 1.0  # AdamW steps each weight by about lr: above 1 it is a typo (1e3 for 1e-3), never a setting


def check_hyperparameters(hp, where: str):
    for name in ("epochs", "batch_size"):
        if not hasattr(hp, name):  # the seed API's loop takes its batches from a DataLoader
            continue
        value = getattr(hp, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r} ({where}); e.g. --{name} "
                             f"{ {'epochs': 10, 'batch_size': 64}[name] }")
    if not hp.lr > 0:
        raise ValueError(f"lr must be positive, got {hp.lr!r} ({where}); e.g. --lr 1e-3")
    if not hp.lr <= MAX_LR:
        raise ValueError(f"lr {hp.lr!r} is above {MAX_LR} ({where}): AdamW moves every weight by about lr each step, so "
                         f"the first steps would wreck the model (1e3 for 1e-3 is the usual slip); e.g. --lr 1e-3")
    # a clip of 0 (or less) zeroes every step, a negative decay pushes weights up: both train silently to nothing
    if hasattr(hp, "grad_clip") and not hp.grad_clip > 0:
        raise ValueError(f"grad_clip must be positive, got {hp.grad_clip!r} ({where}); e.g. grad_clip: 1.0")
    if hasattr(hp, "weight_decay") and not hp.weight_decay >= 0:
        raise ValueError(f"weight_decay must be 0 or more, got {hp.weight_decay!r} ({where}); e.g. weight_decay: 0.05")
    for name, least, example in (("log_every", 1, 10), ("warmup_steps", 0, 50), ("seed", 0, 0)):
        value = getattr(hp, name, least)
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r} ({where}); e.g. "
                             f"{name}: {example}")


def _all_finite(tensors) -> bool:
    """One device sync for all tensors (this runs after every step), not one per tensor."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def fit(model: nn.Module, loss_fn: Callable, batches: Callable[[int], list], steps_per_epoch: int, hp,
        opened: Opening | None = None, epoch_end: Callable[[int], dict] | None = None,
        callback: Callable[[dict], None] | None = None, desc: str = "training", rank: int = 0,
        load: Callable | None = None, threads: Callable[[], int] | None = None) -> list[dict]:
    """Train `model`'s trainable parameters and return the metrics rows of this call.

    loss_fn(batch) -> (loss, {name: tensor}); batches(epoch) -> the epoch's batches, the same for the same
    epoch; with `load`, loss_fn gets load(batch) instead, read by a background thread ahead of the step
    (prefetched); hp: epochs, lr, weight_decay, warmup_steps, grad_clip, seed, log_every. With `opened` (a run folder's
    `RunFolder.opened`), the run starts (config.yaml written, or a resume checked) and gets a checkpoint after every
    epoch and on Ctrl-C, metrics.jsonl, and an exact resume. `epoch_end(epoch)`
    adds validation numbers to the epoch row; `callback(row)` sees every row (live plots). A model may
    define `before_step(step, total_steps)` (phase 1's FSQ warm-up) and `after_optimizer_step()` (phase 1
    clamps its temperature there). `threads()`, asked before each step, is how many threads torch computes
    that step on (a notebook in make demo passes `demo.threads`, its share of the cores); None leaves torch's
    count as it is.
    """
    run, resume = (opened.folder, opened.resume) if opened is not None else (None, False)
    if opened is not None:
        opened.start()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(model, hp.lr, hp.weight_decay, hp.warmup_steps, steps_per_epoch * hp.epochs)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "sums": {}, "count": 0, "seconds": 0.0}
    if resume:
        load_trainable(model, run.load_weights(), run.checkpoint / "model.safetensors")
        state = run.load_state()
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        position = state["position"]
        run.truncate_metrics(position["step"], position["epoch"])
    before_step, after_step = getattr(model, "before_step", None), getattr(model, "after_optimizer_step", None)
    rows = []

    def log(row):
        rows.append(row)
        if run is not None:
            run.log(row)
        if callback is not None:
            callback(row)

    def save(epoch, batch_in_epoch, sums, count, seconds):
        if run is None or not run.main:
            return
        if not _all_finite(params):  # the guard of last resort: a checkpoint is never non-finite
            raise NonFiniteLoss(f"parameters became non-finite at step {step}; not saved. {kept()}")
        where = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "sums": sums, "count": count,
                 "seconds": seconds}
        run.save(step, checkpoint_tensors(model),
                 {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "position": where})

    def kept() -> str:
        if run is None:
            return "Nothing was saved (no run folder)."
        at = run.checkpoint_step()
        if at is None:
            return (f"No checkpoint had been written yet (the first comes at the end of epoch 1), so nothing "
                    f"in {run.path} is kept.")
        return f"The last good checkpoint (step {at}) in {run.path} is kept."

    def stop(what: str, value, parts: dict):
        shown = {k: round(float(v.detach()), 4) for k, v in parts.items()}
        raise NonFiniteLoss(f"{what} became {value} at step {step + 1} (epoch {epoch}); loss parts {shown}. {kept()} "
                            f"Lower lr (now {hp.lr}) or check the inputs, then train again (--overwrite), or "
                            "--resume if the cause was transient")

    step, epoch = position["step"], position["epoch"]
    bar = tqdm(total=steps_per_epoch * hp.epochs, initial=step, desc=desc, disable=rank != 0)
    sums, count, seconds, batch_in_epoch, started = {}, 0, 0.0, 0, time.perf_counter()
    try:
        for epoch in range(position["epoch"], hp.epochs):
            model.train()
            resuming = epoch == position["epoch"]
            skip = position["batch_in_epoch"] if resuming else 0
            sums, count = (dict(position["sums"]), position["count"]) if resuming else ({}, 0)
            seconds, started = (position["seconds"] if resuming else 0.0), time.perf_counter()
            batch_in_epoch = skip
            todo = itertools.islice(batches(epoch), skip, steps_per_epoch)
            for batch in (prefetched(todo, load) if load is not None else todo):
                torch.manual_seed(step_seed(hp.seed, rank, step))
                if threads is not None and (wanted := threads()) != torch.get_num_threads():
                    torch.set_num_threads(wanted)
                if before_step is not None:
                    before_step(step, steps_per_epoch * hp.epochs)
                loss, parts = loss_fn(batch)
                if not torch.isfinite(loss):
                    stop("loss", loss.item(), parts)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
                if not torch.isfinite(grad_norm):
                    stop("gradient norm", grad_norm.item(), parts)
                opt.step()
                sched.step()
                if after_step is not None:
                    after_step()
                if not _all_finite(params):
                    stop("a parameter", "non-finite after the optimizer step", parts)
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                values = {"loss": loss.item(), **{k: float(v.detach()) for k, v in parts.items()}}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update()
                if step % hp.log_every == 0:
                    log({"kind": "step", "step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], **values})
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
            seconds += time.perf_counter() - started
            row = {"kind": "epoch", "step": step, "epoch": epoch, "seconds": seconds,
                   **{f"train {k}": v / max(count, 1) for k, v in sums.items()}}
            if epoch_end is not None:
                row.update(epoch_end(epoch))
            log(row)
            save(epoch + 1, 0, {}, 0, 0.0)
    except KeyboardInterrupt:
        if run is not None and run.main:
            # resume at the first step not completed, with the epoch's sums so far
            seconds += time.perf_counter() - started
            save(epoch, batch_in_epoch, sums, count, seconds)
            print(f"interrupted at step {step}: checkpoint saved in {run.path}; continue with --resume")
        raise
    finally:
        bar.close()
        if run is not None:
            run.close_events()
    model.eval()
    return rows
