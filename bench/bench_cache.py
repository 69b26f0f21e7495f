"""Feature cache speed: one phase-1 epoch (loop.fit, the testbed config) reading frozen features from the
feature cache against the same epoch rendering the SynthTouch images and running the frozen encoders on every
batch, measured in the same run (the ratio is what counts). Both train the same model from the same weights
on the same batches, the two epochs taking turns round after round. The one-off cost of building the cache is
printed beside them. `--off` makes the cache side encode on the fly too (the ratio reads about 1).

The testbed's frozen encoders are tiny (a ViT-Tiny-size tower on 64 px images), so there the cache can only
save what they cost. `--seed_config` measures where the cache is meant to pay: configs/tvl.yaml's model with
its encoders at their real size and 224 px (OpenCLIP ViT-L-14 for vision, the TVL tactile ViT-Tiny for touch),
randomly initialised (nothing is downloaded; the cost of a forward does not depend on the weights), on
SynthTouch rendered at 224 px.

    python bench/bench_cache.py [--n_train 640] [--rounds 3] [--off]
    python bench/bench_cache.py --seed_config --n_train 32 --rounds 2
"""
import argparse
import dataclasses
import functools
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
import timing  # noqa: E402
from features import Features  # noqa: E402


def one_epoch(cfg, read_batch):
    """One training epoch from the same initial weights, whose batch of sample indices `index` is
    read_batch(index)."""
    torch.manual_seed(cfg.seed)
    model = phase1.build_model(cfg)
    n = cfg.n_train
    loop.fit(model, lambda index: model(read_batch(index)), loop.index_batches(n, cfg.batch_size, cfg.seed),
             n // cfg.batch_size, dataclasses.replace(cfg, epochs=1), desc="one epoch")


def sides(cfg, cached: dict, encode, off=False) -> dict:
    """{name: one epoch}: from the cached features, or with encode(index) of each batch; with `off` the cache
    side encodes too."""
    on_the_fly = functools.partial(one_epoch, cfg, encode)
    read = functools.partial(one_epoch, cfg, lambda index: {m: f.batch(index) for m, f in cached.items()})
    return {"cache": on_the_fly if off else read, "on the fly": on_the_fly}


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
    parser.add_argument("--n_train", type=int, default=640, help="training samples (the testbed has 4000)")
    parser.add_argument("--seed_config", action="store_true",
                        help="configs/tvl.yaml's model and encoders (random weights) on SynthTouch at 224 px")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size (default: the config's)")
    timing.add_arguments(parser, "the cache side encodes on the fly")
    args = parser.parse_args()
    timing.start(args)
    overrides = {"n_train": args.n_train}
    if args.seed_config:
        overrides.update(dataset="synthtouch", batch_size=16, warmup_steps=0, encoders={
            "vision": {"name": "openclip-vit-l-14", "pretrained": None}, "touch": "tvl-touch-vit-tiny"})
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = phase1.load_config(phase1.DEFAULT_CONFIG.with_name("tvl.yaml") if args.seed_config else None, **overrides)
    dataset = phase1.make_dataset(cfg, "train")
    encoders = {m: phase1.get_encoder(cfg, m) for m in cfg.model.modalities}
    def encode(index):
        items = data.collate([dataset[int(i)] for i in index])
        return {m: Features(*encoders[m](core.batch_inputs(items, m))) for m in cfg.model.modalities}

    with tempfile.TemporaryDirectory() as cache_dir:  # a cold cache of its own: the build is timed too
        start = time.process_time()
        cached = {m: data.cached_features(e, dataset, cache_dir) for m, e in encoders.items()}
        build = time.process_time() - start
        times = timing.interleaved(sides(cfg, cached, encode, args.off), args.rounds, warm_up=False)[0]
    print(f"one phase-1 epoch, {args.n_train} samples, batch {cfg.batch_size}, {cfg.image_size} px, encoders "
          f"{[cfg.encoders[m] for m in cfg.model.modalities]}")
    print(f"encoding on the fly: {timing.median_time(times['on the fly'])} CPU")
    print(f"from the cache:      {timing.median_time(times['cache'])} CPU  (building the cache once: {build:.1f} s CPU)")
    print(f"speed-up: {timing.spread(times['on the fly'], times['cache'])}")
    encode, step = work_per_pair(cfg, dataset, encoders)
    print(f"work per pair: encoding {encode / 1e9:.2f} GFLOP, a training step {step / 1e9:.2f} GFLOP (forward + "
          f"backward): of the matrix products the cache can save at most {(encode + step) / step:.2f}x; rendering the "
          "images adds to the on-the-fly side")

if __name__ == "__main__":
    main()
