"""The one training loop of both phases (`fit`), the optimizer and schedule, epoch order and step seeds, and
torchrun's ranks (`Distributed`). The run folder `fit` starts, checkpoints and resumes is run_folder.py's:

    with RunFolder(path).opened(config, resume=...) as opened:
        fit(model, loss_fn, batches, steps_per_epoch, hp, opened)

What the loop guarantees, for phase 1 and phase 2 alike, is in run_folder.py's docstring."""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

# what fit drives and saves; RunFolder, load_trainable and tensors_digest stay importable from here (notebooks, tests)
from run_folder import Opening, RunFolder, checkpoint_tensors, load_trainable, tensors_digest


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss, gradient or parameter; nothing non-finite was saved."""


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
    """Whether every element is finite, with one device sync for all tensors (this runs after every step). A sum is
    non-finite when an element is (NaN propagates; +inf and -inf together make NaN) and reads each tensor once without
    writing a mask as large as it: 12x faster than isfinite().all() at one thread, a quarter of a step on a model
    whose read-out maps hold 100M numbers. A sum of finite float32 values overflows only when they average above 3e38 divided
    by their number (1e31 for 30M numbers), far past any weight a run trains."""
    return bool(torch.stack([t.sum() for t in tensors]).sum().isfinite())


def use_threads(count: int):
    """Compute on `count` threads from now on: torch's, and NumPy's BLAS, which otherwise keeps the count
    OMP_NUM_THREADS gave it at start (the end-of-training fits of a run that started on one core of make demo
    would solve on one thread with two free)."""
    torch.set_num_threads(count)
    threadpool_limits(count, user_api="blas")


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
        load_trainable(model, run.load_weights(), run)
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
                    use_threads(wanted)
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
