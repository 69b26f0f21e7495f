"""Evaluation probes in parallel processes: the leakage probes (every k) and the information map of one
phase-1 evaluation, fit in one process against `--processes` processes (default: every core), on the same
encoded splits, measured in the same run (the ratio is what counts). Both give the same tables;
tests/test_evaluate.py proves it on planted data, and this script prints the largest difference.

Default: configs/default.yaml's model with random weights on the SynthTouch validation (probes fit) and test
(probes scored) splits, as `train.py` evaluates a run. `--run` reads a trained phase-1 run instead.

    python bench/bench_probes.py [--run runs/phase1/default] [--processes 2]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import phase1  # noqa: E402


def probes(model, fit, fit_factors, test, test_factors, processes: int):
    """(leakage table, information map, wall seconds) with every probe fit in `processes` processes."""
    evaluate.probe_processes = lambda: processes
    start = time.perf_counter()
    leaks = evaluate.leakage_by_k(model, fit, fit_factors, test, test_factors)
    info = evaluate.information_map({m: e.tokens for m, e in fit.items()}, fit_factors,
                                    {m: e.tokens for m, e in test.items()}, test_factors, model.cfg.n_shared)
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
    (fit_set, fit_feats), (test_set, test_feats) = phase1.split_data(cfg, "val"), phase1.split_data(cfg, "test")
    ks = evaluate.prefix_ks(model)
    fit = evaluate.encode_all(model, fit_feats, ks, reconstruct=False)
    test = evaluate.encode_all(model, test_feats, ks, reconstruct=False)
    splits = fit, fit_set.factor_table(), test, test_set.factor_table()
    print(f"{len(fit_set)} fit / {len(test_set)} scored rows, k in {ks}, {os.cpu_count()} cores")
    one_leaks, one_info, one = probes(model, *splits, processes=1)
    many_leaks, many_info, many = probes(model, *splits, processes=args.processes)
    gap = max((one_leaks.score - many_leaks.score).abs().max(), (one_info.score - many_info.score).abs().max())
    print(f"leakage probes + information map: 1 process {one:.1f} s, {args.processes} processes {many:.1f} s, "
          f"speed-up {one / many:.2f}x (largest score difference {gap:.2g})")


if __name__ == "__main__":
    main()
