"""Training from a feature cache larger than memory: a synthetic token cache of TVL's row shape (257 tokens × 1024,
float16, two modalities) several times a RAM budget, trained through the same path train.py uses (loop.fit with
block-shuffled batches, rows read with preadv by a prefetching thread), against training from RAM on a cache
that fits. Each side runs in its own process, so each peak resident set is its own; the page cache is emptied
of the big cache's files first, so its rows come from the disk. The model is small (hidden 64, one layer): the
benchmark measures the data path, not the step.

    python bench/bench_scale.py [--budget_gb 2] [--cache_gb 6] [--fits_gb 1] [--steps 60]
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
from features import Features  # noqa: E402

TOKENS, WIDTH, MODALITIES = 257, 1024, ("vision", "touch")
ROW_BYTES = TOKENS * WIDTH * 2 + WIDTH * 4 + TOKENS  # tokens (float16), pooled (float32), mask, per modality


def write_cache(folder: Path, rows: int):
    """Random features in data.cached_features' file layout, one folder per modality: one random chunk of rows,
    repeated (the content does not matter for speed, and drawing gigabytes of random numbers takes minutes)."""
    chunk = 256
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


def train_from(folder: Path, in_ram: bool, steps: int, batch: int, block: int) -> dict:
    """Train `steps` steps from the cache in `folder`: loaded into RAM, or read from disk as train.py reads it."""
    files = {m: [folder / m / f"{name}.npy" for name in ("pooled", "tokens", "mask")] for m in MODALITIES}
    if not in_ram:  # rows must come from the disk, not from what writing the cache left in the page cache
        for path in sum(files.values(), []):
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    feats = {m: Features(*(np.load(p, mmap_mode=None if in_ram else "r") for p in paths))
             for m, paths in files.items()}
    n = len(feats[MODALITIES[0]].pooled)
    cfg = core.ModelConfig(modalities=MODALITIES, hidden_dim=64, n_registers=8, n_shared=2, n_layers=1, n_heads=4,
                           embed_dim=64, preservation_weight=0.0)
    torch.manual_seed(0)
    model = core.AlignmentModel(cfg, {m: WIDTH for m in MODALITIES}, {m: TOKENS for m in MODALITIES})
    hp = argparse.Namespace(epochs=1, lr=1e-3, weight_decay=0.05, warmup_steps=10, grad_clip=1.0, seed=0, log_every=10)
    start = time.perf_counter()
    loop.fit(model, model, loop.index_batches(n, batch, seed=0, block=block), min(steps, n // batch), hp,
             desc="from RAM" if in_ram else "from disk", load=lambda index: {m: f.batch(index) for m, f in feats.items()})
    seconds = time.perf_counter() - start
    return {"samples_per_s": min(steps, n // batch) * batch / seconds, "peak_rss_gb": peak_rss_gb(),
            "cache_gb": sum(p.stat().st_size for p in sum(files.values(), [])) / 1e9}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_gb", type=float, default=2.0, help="the RAM budget the big cache exceeds")
    parser.add_argument("--cache_gb", type=float, default=6.0, help="size of the cache larger than the budget")
    parser.add_argument("--fits_gb", type=float, default=1.0, help="size of the cache trained from RAM")
    parser.add_argument("--steps", type=int, default=60, help="training steps timed on each side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=256, help="shuffle_block: samples per block of the epoch order")
    parser.add_argument("--dir", default="cache", help="where the synthetic caches are written (then deleted)")
    parser.add_argument("--side", choices=("ram", "disk"), help=argparse.SUPPRESS)  # the child process's part
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(train_from(args.folder, args.side == "ram", args.steps, args.batch, args.block)))
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir))
    try:
        results = {}
        for side, gb in (("disk", args.cache_gb), ("ram", args.fits_gb)):
            folder = root / side
            write_cache(folder, int(gb * 1e9 / (ROW_BYTES * len(MODALITIES))))
            child = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder), "--steps",
                                    str(args.steps), "--batch", str(args.batch), "--block", str(args.block)],
                                   check=True, stdout=subprocess.PIPE, text=True)
            results[side] = json.loads(child.stdout.strip().splitlines()[-1])
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    disk, ram = results["disk"], results["ram"]
    print(f"{args.steps} steps of batch {args.batch}, rows of {TOKENS} tokens × {WIDTH} (float16) per modality × "
          f"{len(MODALITIES)}, shuffle_block {args.block}, {torch.get_num_threads()} threads; RAM budget "
          f"{args.budget_gb:.1f} GB")
    print(f"from RAM,  cache {ram['cache_gb']:.2f} GB: {ram['samples_per_s']:7.1f} samples/s, peak RSS "
          f"{ram['peak_rss_gb']:.2f} GB")
    print(f"from disk, cache {disk['cache_gb']:.2f} GB: {disk['samples_per_s']:7.1f} samples/s, peak RSS "
          f"{disk['peak_rss_gb']:.2f} GB (within the budget: {disk['peak_rss_gb'] < args.budget_gb})")
    print(f"disk / RAM samples/s: {disk['samples_per_s'] / ram['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
