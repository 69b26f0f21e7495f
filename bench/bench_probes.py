"""Evaluation probes in parallel processes: the leakage probes (every k) and the information map of one
phase-1 evaluation, fit in one process against `--processes` processes (default: every core), on the same
encoded splits, measured in the same run (the ratio is what counts). Both give the same tables;
tests/test_evaluate.py proves it on planted data, and this script prints the largest difference.

Default: configs/default.yaml's model with random weights on the SynthTouch training (probes fit), validation
(probes tuned) and test (probes scored) splits, as `train.py` evaluates a run. `--run` reads a trained phase-1 run instead.

    python bench/bench_probes.py [--run runs/phase1/default] [--processes 2]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import phase1  # noqa: E402


def probes(model, encoded, factors, processes: int):
    """(leakage table, information map, wall seconds) with every probe fit in `processes` processes."""
    evaluate.probe_processes = lambda: processes
    start = time.perf_counter()
    leaks = evaluate.leakage_by_k(model, encoded, factors)
    info = evaluate.information_map({split: {m: e.tokens for m, e in enc.items()} for split, enc in encoded.items()},
                                    factors, model.cfg.n_shared)
    return leaks, info, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained phase-1 run folder (default: random weights)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.run:
        cfg, model = phase1.load_config(args.run / "config.yaml"), phase1.load_aligner(args.run).model
    else:
        cfg = phase1.load_config()
        torch.manual_seed(0)
        model = phase1.build_model(cfg).eval()
    ks = evaluate.prefix_ks(model)
    encoded, factors = {}, {}
    for split, name in zip(evaluate.PROBE_SPLITS, ("train", "val", "test")):
        dataset, feats = phase1.split_data(cfg, name)
        rows = evaluate.fit_rows(len(dataset)) if split == "fit" else np.arange(len(dataset))
        encoded[split] = evaluate.encode_all(model, {m: f.batch(rows) for m, f in feats.items()}, ks, reconstruct=False)
        factors[split] = {key: np.asarray(v)[rows] for key, v in dataset.factor_table().items()}
    print(f"{' / '.join(str(len(f['texture'])) for f in factors.values())} fit / tuning / scored rows, k in {ks}, "
          f"{os.cpu_count()} cores")
    one_leaks, one_info, one = probes(model, encoded, factors, processes=1)
    many_leaks, many_info, many = probes(model, encoded, factors, processes=args.processes)
    gap = max((one_leaks.score - many_leaks.score).abs().max(), (one_info.score - many_info.score).abs().max())
    print(f"leakage probes + information map: 1 process {one:.1f} s, {args.processes} processes {many:.1f} s, "
          f"speed-up {one / many:.2f}x (largest score difference {gap:.2g})")


if __name__ == "__main__":
    main()
