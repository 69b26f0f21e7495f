"""Training from a feature cache larger than memory: a synthetic token cache of TVL's row shape (257 tokens × 1024,
float16, two modalities), at least twice a memory limit, trained through the path train.py uses (loop.fit with
block-shuffled batches, rows read with preadv by a prefetching thread) for whole epochs, against the same epochs
from the same cache loaded into memory. Each side runs in its own process, so its peak resident set and the bytes
it read from the disk (/proc/self/io read_bytes) are its own. Also timed: one epoch of reading alone from each,
so a reader sees how far the disk is from the step. The model is small (hidden 64, one layer): the benchmark
measures the data path, not the step. Wall time here, not CPU time: waiting for the disk is what it measures.
On a shared machine wall time also holds the training thread's waits for a CPU (other processes' load, which
differs from one side's run to the other's); each rate is also given without them (/proc/thread-self/schedstat),
the ratio to compare from run to run. The prefetching thread's waits for a CPU still count: they delay the data.

How the limit is enforced: by the first of these the machine offers (the output says which, and why not those before)
  1. systemd-run --user --scope -p MemoryMax=LIMIT -p MemorySwapMax=0
  2. a cgroup v2 memory group: memory.max (memory.swap.max 0 where present)
  3. a cgroup v1 memory group: memory.limit_in_bytes (memory.memsw.limit_in_bytes too where present: no swap)
A group (2, 3) is a new child of this process's own cgroup that holds the disk side's process alone (it moves
itself in before it starts), and is removed afterwards, after an error or Ctrl-C too; the most it held is printed.
Each charges the page cache the disk side reads to the limit, with its resident set, so an epoch's rows are
evicted before the next epoch could reuse them. Where none can be set, the disk side drops the cache files' pages
from the page cache (posix_fadvise DONTNEED) before every epoch instead: every epoch reads every row from the
disk, as under a limit half the cache's size or less. Either way the page cache is emptied of the files before
the first epoch, and the read bytes show what was read.

`--off` switches off what keeps the disk side fast: rows are read in the training thread (no prefetch) in a fully
shuffled order (shuffle_block 1, no runs of consecutive rows), so the step waits for every batch's reads and
disk / memory drops; the read-only rates show how much slower reading became.

The limit has to hold the process itself too (torch, the model, a few batches: about 1.2 GB peak RSS here), so
the default is 1.5 GB with a 3 GB cache; `--limit_gb 4 --cache_gb 8 --epochs 2` is a larger run.

    python bench/bench_scale.py [--limit_gb 1.5] [--cache_gb 3] [--epochs 1] [--rounds 1] [--off]
"""
import argparse
import contextlib
import dataclasses
import errno
import json
import mmap
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import loop  # noqa: E402
import timing  # noqa: E402
from features import Features  # noqa: E402

TOKENS, WIDTH, MODALITIES = 257, 1024, ("vision", "touch")
ROW_BYTES = TOKENS * WIDTH * 2 + WIDTH * 4 + TOKENS  # tokens (float16), pooled (float32), mask, per modality


def write_cache(folder: Path, rows: int):
    """Random features in data.cached_features' file layout, one folder per modality: one random chunk of rows,
    repeated (the content does not matter for speed, and drawing gigabytes of random numbers takes minutes)."""
    chunk = min(256, rows)
    random_rows = np.random.default_rng(0).standard_normal((chunk, TOKENS, WIDTH), np.float32).astype(np.float16)
    for m in MODALITIES:
        (folder / m).mkdir(parents=True)
        pooled = np.lib.format.open_memmap(folder / m / "pooled.npy", "w+", np.float32, (rows, WIDTH))
        tokens = np.lib.format.open_memmap(folder / m / "tokens.npy", "w+", np.float16, (rows, TOKENS, WIDTH))
        np.save(folder / m / "mask.npy", np.ones((rows, TOKENS), bool))
        for start in tqdm(range(0, rows, chunk), desc=f"writing the {m} cache ({rows} rows)", leave=False):
            stop = min(start + chunk, rows)
            tokens[start:stop] = random_rows[:stop - start]
            pooled[start:stop] = random_rows[:stop - start, 0]
            tokens.flush()
            tokens._mmap.madvise(mmap.MADV_DONTNEED)  # the written pages leave this process
        del pooled, tokens


def cache_files(folder: Path) -> dict[str, list[Path]]:
    return {m: [folder / m / f"{name}.npy" for name in ("pooled", "tokens", "mask")] for m in MODALITIES}


def drop_from_page_cache(paths):
    """The kernel forgets the files' cached pages (written back first), so the next read of them hits the disk."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def disk_read_bytes() -> int:
    """Bytes this process (every thread) has caused to be read from storage, page-cache hits not included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes")


def cpu_wait_s() -> float:
    """Seconds the calling thread has been ready to run but waiting for a CPU (/proc/thread-self/schedstat). On a
    shared machine that is other processes' load, not the data path, so each rate is also given without it."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


class Unavailable(Exception):
    """A way of limiting memory that this machine does not offer; the message says why."""


def systemd_scope(limit_bytes: int, systemd_run: str) -> list[str]:
    """The command prefix that runs a process in a user scope under the limit, once a probe shows it works."""
    scope = [systemd_run, "--user", "--scope", "--quiet", "-p", f"MemoryMax={limit_bytes}", "-p", "MemorySwapMax=0"]
    try:
        probe = subprocess.run([*scope, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(error.strerror if isinstance(error, OSError) else "no answer in 30 s") from error
    if probe.returncode != 0:
        raise Unavailable((probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[0])
    return scope


class CgroupFiles(NamedTuple):
    """What a memory cgroup's files are called in one version of the interface."""
    version: str
    limit: str  # the most the group may hold, its page cache included
    swap: str  # written where present, so that the group cannot swap out what the limit should evict
    swap_counts_memory: bool  # v1's memsw limit is memory + swap (so: the limit); v2's swap.max is swap alone (0)
    peak: str  # the most the group has held (its page cache and resident set together)


CGROUP_V2 = CgroupFiles("v2", "memory.max", "memory.swap.max", False, "memory.peak")
CGROUP_V1 = CgroupFiles("v1", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", True, "memory.max_usage_in_bytes")


def own_memory_cgroups(proc: Path) -> dict[str, Path]:
    """{"v2" / "v1": the folder of this process's own cgroup in a memory hierarchy it can make child groups in},
    from proc/mounts and proc/cgroup (proc is /proc/self; a test passes a fake one)."""
    mounts = {}
    for line in (proc / "mounts").read_text().splitlines():
        _, where, kind, options = line.split()[:4]
        if kind == "cgroup2" or (kind == "cgroup" and "memory" in options.split(",")):
            mounts["v2" if kind == "cgroup2" else "v1"] = Path(where)
    groups = {}
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        version = "v2" if not controllers else "v1" if "memory" in controllers.split(",") else None
        if version in mounts:
            groups[version] = mounts[version] / path.lstrip("/")
    if "v2" in groups:  # a v2 child group gets memory files only where its parent enables the controller for it
        enabled = groups["v2"] / "cgroup.subtree_control"
        if not enabled.is_file() or "memory" not in enabled.read_text().split():
            del groups["v2"]
    return groups


def make_cgroup(parent: Path, files: CgroupFiles, limit_bytes: int) -> Path:
    """A new, uniquely named child group of `parent` that cannot hold more than limit_bytes, nor swap."""
    group = parent / f"bench-scale-{os.getpid()}-{secrets.token_hex(3)}"
    group.mkdir()
    try:
        (group / files.limit).write_text(str(limit_bytes))
        if (parent / files.swap).exists():
            (group / files.swap).write_text(str(limit_bytes if files.swap_counts_memory else 0))
    except OSError:
        group.rmdir()
        raise
    return group


def remove_cgroup(group: Path):
    """rmdir the group, waiting while it is busy: a child killed by Ctrl-C can take a moment to leave it."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return group.rmdir()
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                print(f"could not remove the cgroup {group} ({error.strerror}); rmdir it by hand", file=sys.stderr)
                return
            time.sleep(0.1)


@dataclasses.dataclass
class Limit:
    """How the disk side runs under the memory limit: the prefix of its command ([] when no limit can be set),
    what the output calls it, and the cgroup made for it (with its files' names), if one was."""
    prefix: list[str]
    mechanism: str
    group: Path | None = None
    files: CgroupFiles | None = None

    def peak(self) -> str:
        """The most the cgroup made for the disk side held, as its own counter says ("" without one)."""
        peak = self.group / self.files.peak if self.group else None
        return f"{int(peak.read_text()) / 1e9:.2f} GB ({self.files.peak})" if peak and peak.is_file() else ""


@contextlib.contextmanager
def memory_limit(limit_bytes: int, systemd_run: str = "systemd-run", proc: Path = Path("/proc/self")):
    """Yields the first way this machine offers to run the disk side under limit_bytes: a user scope of systemd;
    a child group of this process's own cgroup, v2 then v1 (the page cache a group reads is charged to it, so a
    cache twice the limit is evicted and read again); else none, and the disk side drops the cache from the page
    cache before every epoch instead. A group made here is removed on the way out, after an error or Ctrl-C too."""
    skipped = []
    try:
        scope = systemd_scope(limit_bytes, systemd_run)
    except Unavailable as why:
        skipped.append(f"systemd-run --user: {why}")
    else:
        yield Limit(scope, f"systemd-run --user --scope -p MemoryMax={limit_bytes / 1e9:.2f}G -p MemorySwapMax=0")
        return
    groups = own_memory_cgroups(proc)
    for files in (CGROUP_V2, CGROUP_V1):
        if files.version not in groups:
            skipped.append(f"cgroup {files.version}: no memory controller to make a child group under")
            continue
        try:
            group = make_cgroup(groups[files.version], files, limit_bytes)
        except OSError as error:
            skipped.append(f"cgroup {files.version}: {error.strerror}")
            continue
        swap = f" and {files.swap} (no swap)" if (group / files.swap).exists() else ""
        # the shell moves itself into the group and then becomes the disk side's process (exec keeps its pid):
        # it runs there from its first instruction, and nothing else is moved
        move_in = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs")]
        try:
            yield Limit(move_in, f"cgroup {files.version} memory controller: a new child group of this process's "
                                 f"own with {files.limit} {limit_bytes / 1e9:.2f} GB{swap} (not {'; not '.join(skipped)})",
                        group, files)
        finally:
            remove_cgroup(group)
        return
    yield Limit([], f"no memory limit can be set here ({'; '.join(skipped)}); instead the cache's pages are "
                    "dropped from the page cache (posix_fadvise DONTNEED) before every epoch, so every epoch reads "
                    "every row from the disk")


def train_from(folder: Path, in_memory: bool, epochs: int, batch: int, block: int, prefetch: bool,
               drop_each_epoch: bool) -> dict:
    """Read one epoch, then train `epochs` epochs, from the cache in `folder`: loaded into memory, or read from
    disk as train.py reads it. Rates in samples per wall second."""
    files = cache_files(folder)
    paths = sum(files.values(), [])
    start = time.perf_counter()
    feats = {m: Features(*(np.load(p, mmap_mode=None if in_memory else "r") for p in ps)) for m, ps in files.items()}
    load_seconds = time.perf_counter() - start
    n = len(feats[MODALITIES[0]].pooled)
    batches = loop.index_batches(n, batch, seed=0, block=block)

    def read(index):
        return {m: f.batch(index) for m, f in feats.items()}

    def epoch_batches(epoch):  # called as each epoch starts
        if drop_each_epoch:
            drop_from_page_cache(paths)
        return batches(epoch)

    if not in_memory:  # rows must come from the disk, not from what writing the cache left behind
        drop_from_page_cache(paths)
    start, waited, read_before = time.perf_counter(), cpu_wait_s(), disk_read_bytes()
    for index in tqdm(batches(0), desc="reading one epoch", leave=False):
        read(index)
    read_only = (time.perf_counter() - start - (cpu_wait_s() - waited), disk_read_bytes() - read_before)

    cfg = core.ModelConfig(modalities=MODALITIES, hidden_dim=64, n_registers=8, n_shared=2, n_layers=1, n_heads=4,
                           embed_dim=64, preservation_weight=0.0)
    torch.manual_seed(0)
    model = core.AlignmentModel(cfg, {m: WIDTH for m in MODALITIES}, {m: TOKENS for m in MODALITIES})
    hp = argparse.Namespace(epochs=epochs, lr=1e-3, weight_decay=0.05, warmup_steps=10, grad_clip=1.0, seed=0,
                            log_every=10)
    steps = n // batch
    if not in_memory:  # the first epoch starts cold on both mechanisms
        drop_from_page_cache(paths)
    start, cpu, waited, read_before = time.perf_counter(), time.process_time(), cpu_wait_s(), disk_read_bytes()
    loop.fit(model, model if prefetch else (lambda index: model(read(index))), epoch_batches, steps, hp,
             desc="from memory" if in_memory else "from disk", load=read if prefetch else None)
    seconds, waited = time.perf_counter() - start, cpu_wait_s() - waited
    return {"seconds": seconds, "samples_per_s": steps * batch * epochs / seconds, "cpu_s": time.process_time() - cpu,
            "cpu_wait_s": waited, "samples_per_s_unwaited": steps * batch * epochs / (seconds - waited),
            "read_gb": (disk_read_bytes() - read_before) / 1e9, "read_only_samples_per_s": steps * batch / read_only[0],
            "read_only_gb": read_only[1] / 1e9, "load_s": load_seconds, "peak_rss_gb": peak_rss_gb(),
            "cache_gb": sum(p.stat().st_size for p in paths) / 1e9, "samples": n}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit_gb", type=float, default=1.5, help="the memory limit the disk side runs under")
    parser.add_argument("--cache_gb", type=float, default=3.0, help="cache size (at least twice the limit)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs on each side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=256, help="shuffle_block: samples per block of the epoch order")
    parser.add_argument("--dir", default="cache", help="where the synthetic cache is written (then deleted)")
    timing.add_arguments(parser, "no prefetching thread, no shuffle blocks", rounds=1)
    parser.add_argument("--side", choices=("memory", "disk"), help=argparse.SUPPRESS)  # the child process's part
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--drop_each_epoch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        torch.set_num_threads(args.threads)
        print(json.dumps(train_from(args.folder, args.side == "memory", args.epochs, args.batch,
                                    1 if args.off else args.block, not args.off, args.drop_each_epoch)))
        return
    if args.cache_gb < 2 * args.limit_gb:
        parser.error(f"--cache_gb {args.cache_gb} is less than twice --limit_gb {args.limit_gb}")
    timing.start(args, "wall time (disk waits are the point)")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir))
    results = {side: [] for side in ("disk", "memory")}
    with memory_limit(int(args.limit_gb * 1e9)) as limit:
        print(f"memory limit of the disk side: {limit.mechanism}")
        try:
            write_cache(root, int(args.cache_gb * 1e9 / (ROW_BYTES * len(MODALITIES))))
            for _ in range(args.rounds):  # sides in turn, each a process of its own
                for side in results:
                    command = [sys.executable, __file__, "--side", side, "--folder", str(root), "--epochs",
                               str(args.epochs), "--batch", str(args.batch), "--block", str(args.block),
                               "--threads", str(args.threads)] + ["--off"] * args.off
                    if side == "disk" and not limit.prefix:
                        command.append("--drop_each_epoch")
                    child = subprocess.run((limit.prefix if side == "disk" else []) + command, check=True,
                                           stdout=subprocess.PIPE, text=True)
                    results[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        group_peak = limit.peak()
    disk, memory = results["disk"][-1], results["memory"][-1]
    print(f"{args.epochs} epoch(s) of {disk['samples']} samples, batch {args.batch}, rows of {TOKENS} tokens × {WIDTH} "
          f"(float16) per modality × {len(MODALITIES)}, shuffle_block {1 if args.off else args.block}, "
          f"{'no prefetching' if args.off else 'prefetched'}; cache {disk['cache_gb']:.2f} GB, limit "
          f"{args.limit_gb:.2f} GB")
    for name, r in (("from memory", memory), ("from disk", disk)):
        print(f"  {name:12s} training {r['samples_per_s']:6.1f} samples/s, {r['samples_per_s_unwaited']:6.1f} without "
              f"waits for a CPU ({r['seconds']:.0f} s wall, {r['cpu_wait_s']:.0f} s of them waiting for a CPU; "
              f"{r['cpu_s']:.0f} s CPU), read {r['read_gb']:5.2f} GB from disk, peak RSS {r['peak_rss_gb']:.2f} GB; "
              f"reading alone {r['read_only_samples_per_s']:7.1f} samples/s ({r['read_only_gb']:.2f} GB from disk)")
    print(f"  the disk side's peak RSS is {'within' if disk['peak_rss_gb'] <= args.limit_gb else 'above'} the limit")
    if group_peak:
        print(f"  the disk side's cgroup held at most {group_peak}: its page cache and resident set together")
    wall = {side: [r["seconds"] for r in rs] for side, rs in results.items()}
    unwaited = {side: [r["seconds"] - r["cpu_wait_s"] for r in rs] for side, rs in results.items()}
    print(f"  disk / memory training samples/s: {timing.spread(wall['memory'], wall['disk'])} wall, "
          f"{timing.spread(unwaited['memory'], unwaited['disk'])} without waits for a CPU; reading alone runs "
          f"{disk['read_only_samples_per_s'] / disk['samples_per_s_unwaited']:.1f}x faster than training from disk")
    if disk["read_gb"] < 0.9 * args.epochs * disk["cache_gb"]:
        print(f"  WARNING: the disk side read {disk['read_gb']:.2f} GB from the disk, less than its {args.epochs} "
              f"epoch(s) of {disk['cache_gb']:.2f} GB: part of it came from the page cache")


if __name__ == "__main__":
    main()
