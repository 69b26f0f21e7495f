"""All-k evaluation speed: one forward pass per modality (every prefix k read off the causal register
outputs) against one truncated forward pass per k, on the same features, measured in the same run
(the ratio is what counts). Both give the same table; tests/test_evaluate.py proves it.

    python bench/bench_eval.py [--n 1000] [--repeats 3]
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import evaluate  # noqa: E402
import phase1  # noqa: E402
from features import Features  # noqa: E402


def best_time(fn, repeats: int) -> tuple[object, float]:
    """The fastest of `repeats` runs: the least disturbed by other processes on a shared machine."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def compare(model: core.AlignmentModel, features: dict, repeats: int, what: str):
    evaluate.evaluate_prefixes(model, {m: Features(*(a[:64] for a in f)) for m, f in features.items()}, None)
    one, fast = best_time(lambda: evaluate.evaluate_prefixes(model, features, None), repeats)
    each, slow = best_time(lambda: evaluate.evaluate_prefixes(model, features, None, one_pass=False), repeats)
    same = bool(((one - each).abs() < 1e-5).all().all())
    print(f"{what}: one truncated pass per k {slow:.2f} s, one pass for every k {fast:.2f} s, "
          f"speed-up {slow / fast:.1f}x (same table: {same})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="test items (the default test split size)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions; the fastest counts")
    args = parser.parse_args()
    cfg = phase1.load_config()  # the testbed's model shape; weights do not matter for speed
    dims = {m: phase1.get_encoder(cfg, m).dim for m in cfg.model.modalities}
    n_tokens = {m: phase1.get_encoder(cfg, m).num_tokens for m in cfg.model.modalities}
    torch.manual_seed(0)
    features = {m: Features(torch.randn(args.n, dims[m]), torch.randn(args.n, n_tokens[m], dims[m]),
                                 torch.ones(args.n, n_tokens[m], dtype=torch.bool)) for m in cfg.model.modalities}
    print(f"{args.n} items × {len(cfg.model.modalities)} modalities, k in {cfg.model.prefix_lengths}, design "
          f"{cfg.model.design} ({cfg.model.n_registers} registers, hidden {cfg.model.hidden_dim}), "
          f"{torch.get_num_threads()} threads")
    # The preservation decoder runs once per k either way (each k keeps other registers), so the
    # one-pass saving is in the register module; the second line shows it alone.
    for what, preservation in (("retrieval + preservation cosine", cfg.model.preservation_weight), ("retrieval only", 0.0)):
        model_cfg = dataclasses.replace(cfg.model, preservation_weight=preservation)
        compare(core.AlignmentModel(model_cfg, dims, n_tokens).eval(), features, args.repeats, what)


if __name__ == "__main__":
    main()
