"""Feature cache speed: one phase-1 epoch (loop.fit, the testbed config) reading frozen features from the
feature cache against the same epoch rendering the SynthTouch images and running the frozen encoders on every
batch, measured in the same run (the ratio is what counts). Both train the same model from the same weights
on the same batches. The one-off cost of building the cache is printed beside them.

The testbed's frozen encoders are tiny (a ViT-Tiny-size tower on 64 px images), so there the cache can only
save what they cost. `--seed_config` measures where the cache is meant to pay: configs/tvl.yaml's model with
its encoders at their real size and 224 px (OpenCLIP ViT-L-14 for vision, the TVL tactile ViT-Tiny for touch),
randomly initialised (nothing is downloaded; the cost of a forward does not depend on the weights), on
SynthTouch rendered at 224 px.

    python bench/bench_cache.py [--n_train 4000]
    python bench/bench_cache.py --seed_config --n_train 64
"""
import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import data  # noqa: E402
import loop  # noqa: E402
import phase1  # noqa: E402
from features import Features  # noqa: E402


def one_epoch(cfg, read_batch) -> tuple[float, float]:
    """(wall, CPU) seconds of one training epoch whose batch of sample indices `index` is read_batch(index). CPU
    time is what the epoch costs whatever else the machine runs; wall time is what it took on this one now."""
    torch.manual_seed(cfg.seed)
    model = phase1.build_model(cfg)
    n = cfg.n_train
    start, start_cpu = time.perf_counter(), time.process_time()
    loop.fit(model, lambda index: model(read_batch(index)), loop.index_batches(n, cfg.batch_size, cfg.seed),
             n // cfg.batch_size, dataclasses.replace(cfg, epochs=1), desc="one epoch")
    return time.perf_counter() - start, time.process_time() - start_cpu


def work_per_pair(cfg, dataset, encoders) -> tuple[float, float]:
    """Floating-point operations per pair of encoding (the frozen encoders' forward) and of a training step
    (forward + backward, at the config's batch), as torch.utils.flop_counter counts them. Their ratio bounds what
    the cache can save of the matrix products; rendering images and reading the cache are not counted."""
    items = data.collate([dataset[i] for i in range(2)])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        feats = {m: Features(*encoders[m](core.batch_inputs(items, m))) for m in cfg.model.modalities}
    encode = counter.get_total_flops() / 2
    copies = max(cfg.batch_size // 2, 1)
    batch = {m: Features(*(t.repeat(copies, *[1] * (t.dim() - 1)) for t in f)) for m, f in feats.items()}
    model = phase1.build_model(cfg, feats).train()
    with FlopCounterMode(display=False) as counter:
        model(batch)[0].backward()
    return encode, counter.get_total_flops() / (2 * copies)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_train", type=int, default=4000, help="training samples (the testbed's n_train)")
    parser.add_argument("--seed_config", action="store_true",
                        help="configs/tvl.yaml's model and encoders (random weights) on SynthTouch at 224 px")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size (default: the config's)")
    args = parser.parse_args()
    overrides = {"n_train": args.n_train}
    if args.seed_config:
        overrides.update(dataset="synthtouch", batch_size=16, warmup_steps=0, encoders={
            "vision": {"name": "openclip-vit-l-14", "pretrained": None}, "touch": "tvl-touch-vit-tiny"})
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = phase1.load_config(phase1.DEFAULT_CONFIG.with_name("tvl.yaml") if args.seed_config else None, **overrides)
    dataset = phase1.make_dataset(cfg, "train")
    encoders = {m: phase1.get_encoder(cfg, m) for m in cfg.model.modalities}
    with tempfile.TemporaryDirectory() as cache_dir:  # a cold cache of its own: the build is timed too
        start = time.perf_counter()
        cached = {m: data.cached_features(e, dataset, cache_dir) for m, e in encoders.items()}
        build = time.perf_counter() - start
        from_cache = one_epoch(cfg, lambda index: {m: f.batch(index) for m, f in cached.items()})

    def encode(index):
        items = data.collate([dataset[int(i)] for i in index])
        return {m: Features(*encoders[m](core.batch_inputs(items, m))) for m in cfg.model.modalities}

    on_the_fly = one_epoch(cfg, encode)
    print(f"one phase-1 epoch, {args.n_train} samples, batch {cfg.batch_size}, {cfg.image_size} px, encoders "
          f"{[cfg.encoders[m] for m in cfg.model.modalities]}, {torch.get_num_threads()} threads")
    print(f"encoding on the fly: {on_the_fly[0]:7.1f} s wall {on_the_fly[1]:7.1f} s CPU")
    print(f"from the cache:      {from_cache[0]:7.1f} s wall {from_cache[1]:7.1f} s CPU  (building the cache once: "
          f"{build:.1f} s wall)")
    print(f"speed-up: {on_the_fly[1] / from_cache[1]:.1f}x CPU time, {on_the_fly[0] / from_cache[0]:.1f}x wall")
    encode, step = work_per_pair(cfg, dataset, encoders)
    print(f"work per pair: encoding {encode / 1e9:.2f} GFLOP, a training step {step / 1e9:.2f} GFLOP (forward + "
          f"backward): of the matrix products the cache can save at most {(encode + step) / step:.2f}x; rendering the "
          "images adds to the on-the-fly side")

if __name__ == "__main__":
    main()
