"""Evaluation probes in parallel processes: the leakage probes (every k) and the information map of one
phase-1 evaluation, fit in one process against `--processes` processes (default: every core), on the same
encoded splits, the two taking turns round after round (the ratio is what counts). Both give the same tables;
tests/test_evaluate.py proves it on planted data, and this script prints the largest difference. This is the one
benchmark timed in wall seconds: more processes do the same CPU work, what they save is waiting.

Default: configs/default.yaml's model with random weights on small SynthTouch training (probes fit), validation
(probes tuned) and test (probes scored) splits, their features cached on first use, as `train.py` evaluates a
run; nothing else need exist. `--run` reads a trained phase-1 run and its splits instead. `--off` fits in one
process on both sides (the ratio reads about 1).

    python bench/bench_probes.py [--n_train 1000] [--run runs/demo/phase1/default] [--processes 2] [--off]
"""
import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import information  # noqa: E402
import phase1  # noqa: E402
import prefixes  # noqa: E402
import timing  # noqa: E402


def probes(model, encoded, factors, processes: int):
    """(leakage table, information map) with every probe fit in `processes` processes (as many as torch's threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(processes)
    try:
        leaks = information.leakage_by_k(model, encoded, factors)
        info = information.information_map({split: {m: e.tokens for m, e in enc.items()}
                                            for split, enc in encoded.items()}, factors, model.cfg.n_shared)
    finally:
        torch.set_num_threads(threads)
    return leaks, info


def sides(model, encoded, factors, processes: int, off=False) -> dict:
    """{name: (leakage table, information map)}: in one process, and in `processes` (with `off`, one again)."""
    one = functools.partial(probes, model, encoded, factors, processes=1)
    return {"one": one, "many": one if off else functools.partial(probes, model, encoded, factors, processes=processes)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained phase-1 run folder (default: random weights)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--n_train", type=int, default=500,
                        help="training samples without --run (probes fit on up to 2000 of them); validation and test "
                             "splits a fifth and two fifths of it")
    timing.add_arguments(parser, "probes fit in one process on both sides", rounds=2)
    args = parser.parse_args()
    timing.start(args, "wall time (the processes share the CPU work)")
    if args.run:
        cfg, model = phase1.load_config(args.run / "config.yaml"), phase1.load_aligner(args.run).model
    else:
        cfg = phase1.load_config(n_train=args.n_train, n_val=args.n_train // 5, n_test=2 * args.n_train // 5)
        torch.manual_seed(0)
        model = phase1.build_model(cfg).eval()
    ks = prefixes.prefix_ks(model)
    encoded, factors = {}, {}
    for split, name in zip(information.PROBE_SPLITS, ("train", "val", "test")):
        dataset, feats = phase1.split_data(cfg, name)
        rows = information.fit_rows(len(dataset)) if split == "fit" else np.arange(len(dataset))
        encoded[split] = prefixes.encode_all(model, {m: f.batch(rows) for m, f in feats.items()}, ks, reconstruct=False)
        factors[split] = {key: np.asarray(v)[rows] for key, v in dataset.factor_table().items()}
    print(f"{' / '.join(str(len(f['texture'])) for f in factors.values())} fit / tuning / scored rows, k in {ks}, "
          f"{os.cpu_count()} cores")
    many = 1 if args.off else args.processes
    times, out = timing.interleaved(sides(model, encoded, factors, args.processes, args.off), args.rounds,
                                    warm_up=False, clock=time.perf_counter)
    (one_leaks, one_info), (many_leaks, many_info) = out["one"], out["many"]
    gap = max((one_leaks.score - many_leaks.score).abs().max(), (one_info.score - many_info.score).abs().max())
    print(f"leakage probes + information map: 1 process {timing.median_time(times['one'])} wall, {many} processes "
          f"{timing.median_time(times['many'])} wall, speed-up {timing.spread(times['one'], times['many'])} "
          f"(largest score difference {gap:.2g})")


if __name__ == "__main__":
    main()
