"""All-k evaluation speed: one forward pass per modality (every prefix k read off the causal register
outputs) against one truncated forward pass per k, on the same features, measured in the same run
(the ratio is what counts). Both give the same table; tests/test_evaluate.py proves it. `--off` runs one pass
per k on both sides (the ratio reads about 1).

    python bench/bench_eval.py [--n 1000] [--rounds 3] [--off]
"""
import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import evaluate  # noqa: E402
import phase1  # noqa: E402
import timing  # noqa: E402
from features import Features  # noqa: E402


def sides(model: core.AlignmentModel, features: dict, off=False) -> dict:
    """{name: the all-k table}; with `off` the one-pass side is the pass-per-k evaluation."""
    per_k = functools.partial(evaluate.evaluate_prefixes, model, features, None, one_pass=False)
    return {"one pass": per_k if off else functools.partial(evaluate.evaluate_prefixes, model, features, None),
            "pass per k": per_k}


def compare(model: core.AlignmentModel, features: dict, rounds: int, off: bool, what: str):
    times, tables = timing.interleaved(sides(model, features, off), rounds)
    same = bool(((tables["one pass"] - tables["pass per k"]).abs() < 1e-5).all().all())
    print(f"{what}: one truncated pass per k {timing.median_time(times['pass per k'])} CPU, one pass for every k "
          f"{timing.median_time(times['one pass'])} CPU, speed-up {timing.spread(times['pass per k'], times['one pass'])} "
          f"(same table: {same})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="test items (the default test split size)")
    timing.add_arguments(parser, "the one-pass side runs one truncated pass per k")
    args = parser.parse_args()
    timing.start(args)
    cfg = phase1.load_config()  # the testbed's model shape; weights do not matter for speed
    dims = {m: phase1.get_encoder(cfg, m).dim for m in cfg.model.modalities}
    n_tokens = {m: phase1.get_encoder(cfg, m).num_tokens for m in cfg.model.modalities}
    torch.manual_seed(0)
    features = {m: Features(torch.randn(args.n, dims[m]), torch.randn(args.n, n_tokens[m], dims[m]),
                                 torch.ones(args.n, n_tokens[m], dtype=torch.bool)) for m in cfg.model.modalities}
    print(f"{args.n} items × {len(cfg.model.modalities)} modalities, k in {cfg.model.prefix_lengths}, design "
          f"{cfg.model.design} ({cfg.model.n_registers} registers, hidden {cfg.model.hidden_dim})")
    # The preservation decoder runs once per k either way (each k keeps other registers), so the
    # one-pass saving is in the register module; the second line shows it alone.
    for what, preservation in (("retrieval + preservation cosine", cfg.model.preservation_weight), ("retrieval only", 0.0)):
        model_cfg = dataclasses.replace(cfg.model, preservation_weight=preservation)
        compare(core.AlignmentModel(model_cfg, dims, n_tokens).eval(), features, args.rounds, args.off, what)


if __name__ == "__main__":
    main()
