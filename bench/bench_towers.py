"""Phase-1 training step of configs/default.yaml on two threads: each modality's tower (register module, embedding
head, preservation decoder; forward and backward) on a core of its own (towers.py) against the towers one after
another, each split over both threads, and against one thread. A step is the model's loss, backward, gradient
clipping and AdamW, on one fixed batch of cached SynthTouch features. `--off` runs the towers one after another on
both sides (the ratio then reads about 1).

Wall time, not CPU time: what a second thread buys is the question (CPU time would show how much of it is spent
waiting). The sides run in turn, round after round, so a busy moment hits them alike.

    python bench/bench_towers.py [--rounds 5] [--threads 2] [--off]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop  # noqa: E402
import phase1  # noqa: E402
import timing  # noqa: E402
import towers  # noqa: E402


def step_fn(model, steps: int, threads: int, side_by_side: bool):
    """`steps` training steps of `model` on one batch, on `threads` threads, its towers side by side or not."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = loop.make_optimizer(model, 1e-3, 0.05, 50, 1000)

    def run(batch):
        torch.set_num_threads(threads)
        towers.SIDE_BY_SIDE = side_by_side
        try:
            for _ in range(steps):
                loss, _ = model(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        finally:
            towers.SIDE_BY_SIDE = True
        return loss.item()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="training steps a side takes per round")
    parser.add_argument("--n_train", type=int, default=None, help="training pairs to cache (default: the config's)")
    timing.add_arguments(parser, "the towers run one after another on both sides", rounds=5, threads=2)
    args = parser.parse_args(argv)
    timing.start(args, "wall time")
    overrides = {} if args.n_train is None else {"n_train": args.n_train}
    cfg = phase1.load_config(None, output_dir="runs/bench/towers", **overrides)
    _, feats = phase1.split_data(cfg, "train")
    torch.manual_seed(cfg.seed)
    model = phase1.build_model(cfg, feats)
    model.set_feature_centres(feats)
    model.train()
    batch = {m: f.batch(np.arange(cfg.batch_size)) for m, f in feats.items()}
    sides = {"one thread": step_fn(model, args.steps, 1, False),
             "towers one after another": step_fn(model, args.steps, args.threads, False),
             "towers side by side": step_fn(model, args.steps, args.threads, not args.off)}
    times, _ = timing.interleaved({name: lambda fn=fn: fn(batch) for name, fn in sides.items()}, args.rounds,
                                  clock=time.perf_counter)
    print(f"phase-1 step of configs/default.yaml ({cfg.model.modalities}, batch {cfg.batch_size}), {args.steps} steps "
          f"a round")
    for name, spent in times.items():
        print(f"  {name:26s} {timing.median_time([t / args.steps for t in spent])} a step")
    side_by_side = times["towers side by side"]
    print(f"towers side by side on {args.threads} threads: {timing.spread(times['towers one after another'], side_by_side)} "
          f"the speed of the towers one after another, {timing.spread(times['one thread'], side_by_side)} that of one "
          "thread")


if __name__ == "__main__":
    main()
