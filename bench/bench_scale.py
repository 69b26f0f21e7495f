"""Training from a feature cache larger than memory: a synthetic token cache of TVL's row shape (257 tokens × 1024,
float16, two modalities), at least twice a memory limit, trained through the path train.py uses (loop.fit with
block-shuffled batches, rows read with preadv by a prefetching thread) for whole epochs, against the same epochs
from the same cache loaded into memory. Each side runs in its own process, so its peak resident set and the bytes
it read from the disk (/proc/self/io read_bytes) are its own. Also timed: one epoch of reading alone from each,
so a reader sees how far the disk is from the step. The model is small (hidden 64, one layer): the benchmark
measures the data path, not the step. Wall time here, not CPU time: waiting for the disk is what it measures.

How the limit is enforced, whichever this machine offers (the output says which):
  systemd-run --user --scope -p MemoryMax=LIMIT   the disk side runs in a scope whose page cache and resident set
                                                  together cannot pass LIMIT, so rows of an epoch are evicted
                                                  before the next epoch can reuse them
  otherwise                                       no limit can be set (no user systemd, no cgroup v2 memory
                                                  controller for this user); the disk side drops the cache files'
                                                  pages from the page cache (posix_fadvise DONTNEED) before every
                                                  epoch instead, so every epoch reads every row from the disk, as
                                                  under a limit half the cache's size or less
Either way the page cache is emptied of the files before the first epoch, and the read bytes show what was read.

`--off` switches off what keeps the disk side fast: rows are read in the training thread (no prefetch) in a fully
shuffled order (shuffle_block 1, no runs of consecutive rows); with a step far slower than reading, disk / memory
still reads about 1, and the read-only rates show how much slower reading became.

The limit has to hold the process itself too (torch, the model, a few batches: about 1.2 GB peak RSS here), so
the default is 1.5 GB with a 3 GB cache; `--limit_gb 4 --cache_gb 8 --epochs 2` is a larger run.

    python bench/bench_scale.py [--limit_gb 1.5] [--cache_gb 3] [--epochs 1] [--rounds 1] [--off]
"""
import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def limit_command(limit_bytes: int) -> tuple[list[str], str]:
    """(the command prefix that runs a process under a memory limit, or [] when none can be set, what is used)."""
    scope = ["systemd-run", "--user", "--scope", "--quiet", "-p", f"MemoryMax={limit_bytes}", "-p", "MemorySwapMax=0"]
    try:
        probe = subprocess.run([*scope, "true"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return scope, f"systemd-run --user --scope -p MemoryMax={limit_bytes / 1e9:.2f}G"
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[0]
    except (OSError, subprocess.TimeoutExpired) as error:
        why = str(error)
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    v2 = controllers.read_text().split() if controllers.is_file() else []
    return [], (f"no memory limit can be set here (systemd-run --user: {why}; cgroup v2 memory controller: "
                f"{'present, not delegated to this user' if 'memory' in v2 else 'absent'}); instead the cache's pages "
                "are dropped from the page cache (posix_fadvise DONTNEED) before every epoch, so every epoch reads "
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
    start, read_before = time.perf_counter(), disk_read_bytes()
    for index in tqdm(batches(0), desc="reading one epoch", leave=False):
        read(index)
    read_only = (time.perf_counter() - start, disk_read_bytes() - read_before)

    cfg = core.ModelConfig(modalities=MODALITIES, hidden_dim=64, n_registers=8, n_shared=2, n_layers=1, n_heads=4,
                           embed_dim=64, preservation_weight=0.0)
    torch.manual_seed(0)
    model = core.AlignmentModel(cfg, {m: WIDTH for m in MODALITIES}, {m: TOKENS for m in MODALITIES})
    hp = argparse.Namespace(epochs=epochs, lr=1e-3, weight_decay=0.05, warmup_steps=10, grad_clip=1.0, seed=0,
                            log_every=10)
    steps = n // batch
    if not in_memory:  # the first epoch starts cold on both mechanisms
        drop_from_page_cache(paths)
    start, cpu, read_before = time.perf_counter(), time.process_time(), disk_read_bytes()
    loop.fit(model, model if prefetch else (lambda index: model(read(index))), epoch_batches, steps, hp,
             desc="from memory" if in_memory else "from disk", load=read if prefetch else None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples_per_s": steps * batch * epochs / seconds, "cpu_s": time.process_time() - cpu,
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
    prefix, mechanism = limit_command(int(args.limit_gb * 1e9))
    print(f"memory limit of the disk side: {mechanism}")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir))
    results = {side: [] for side in ("disk", "memory")}
    try:
        write_cache(root, int(args.cache_gb * 1e9 / (ROW_BYTES * len(MODALITIES))))
        for _ in range(args.rounds):  # sides in turn, each a process of its own
            for side in results:
                command = [sys.executable, __file__, "--side", side, "--folder", str(root), "--epochs",
                           str(args.epochs), "--batch", str(args.batch), "--block", str(args.block),
                           "--threads", str(args.threads)] + ["--off"] * args.off
                if side == "disk" and not prefix:
                    command.append("--drop_each_epoch")
                child = subprocess.run((prefix if side == "disk" else []) + command, check=True,
                                       stdout=subprocess.PIPE, text=True)
                results[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    disk, memory = results["disk"][-1], results["memory"][-1]
    print(f"{args.epochs} epoch(s) of {disk['samples']} samples, batch {args.batch}, rows of {TOKENS} tokens × {WIDTH} "
          f"(float16) per modality × {len(MODALITIES)}, shuffle_block {1 if args.off else args.block}, "
          f"{'no prefetching' if args.off else 'prefetched'}; cache {disk['cache_gb']:.2f} GB, limit "
          f"{args.limit_gb:.2f} GB")
    for name, r in (("from memory", memory), ("from disk", disk)):
        print(f"  {name:12s} training {r['samples_per_s']:6.1f} samples/s ({r['cpu_s']:.0f} s CPU), read "
              f"{r['read_gb']:5.2f} GB from disk, peak RSS {r['peak_rss_gb']:.2f} GB; reading alone "
              f"{r['read_only_samples_per_s']:7.1f} samples/s ({r['read_only_gb']:.2f} GB from disk)")
    print(f"  the disk side's peak RSS is {'within' if disk['peak_rss_gb'] <= args.limit_gb else 'above'} the limit")
    seconds = {side: [r["seconds"] for r in rs] for side, rs in results.items()}
    print(f"  disk / memory training samples/s: {timing.spread(seconds['memory'], seconds['disk'])}; reading alone runs "
          f"{disk['read_only_samples_per_s'] / disk['samples_per_s']:.1f}x faster than training from disk")
    if disk["read_gb"] < 0.9 * args.epochs * disk["cache_gb"]:
        print(f"  WARNING: the disk side read {disk['read_gb']:.2f} GB from the disk, less than its {args.epochs} "
              f"epoch(s) of {disk['cache_gb']:.2f} GB: part of it came from the page cache")


if __name__ == "__main__":
    main()
