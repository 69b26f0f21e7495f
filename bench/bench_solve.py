"""The end-of-training read-out solve (readout_fit.solve_readouts) at the testbed's sizes: configs/default.yaml's
model with random weights, its vision decoder alone, random register tokens and frozen features of the default's
shapes (16 registers of width 128; 64 feature tokens of width 128), --n_fit fit rows (more than the 2048 numbers
of all tokens, so every k solves in the primal form, as on the default's 4000) and an eighth as many validation
rows. Against the same solve with the fit rows' products with the targets made anew at every k
(readout_fit.SLICED_PRODUCTS off); the solved maps are checked to agree. `--off` runs the baseline on both sides
(the ratio reads about 1).

    python bench/bench_solve.py [--n_fit 2400] [--rounds 2] [--off]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phase1  # noqa: E402
import readout_fit  # noqa: E402
import timing  # noqa: E402
from features import Features  # noqa: E402


def solved_maps(model, fit, select, tokens, sliced: bool) -> dict:
    """Every decoder's solved maps (weights of both layers) after a solve, sliced products or not."""
    readout_fit.SLICED_PRODUCTS = sliced
    try:
        for decoder in model.decoders.values():
            decoder.solved = torch.nn.ModuleList()
        readout_fit.solve_readouts(model, fit, select, tokens)
    finally:
        readout_fit.SLICED_PRODUCTS = True
    return {(m, g): (solved[1].weight @ solved[0].weight).clone()
            for m, decoder in model.decoders.items() for g, solved in enumerate(decoder.solved)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_fit", type=int, default=2400, help="fit rows (validation rows: an eighth as many)")
    timing.add_arguments(parser, "products made at each k", rounds=2)
    args = parser.parse_args()
    timing.start(args)
    cfg = phase1.load_config()
    torch.manual_seed(0)
    model = phase1.build_model(cfg).eval()
    del model.decoders["touch"]  # one modality: the other solves alike, in a thread of its own in training
    R, H = cfg.model.n_registers, cfg.model.hidden_dim

    def split(n):
        shapes = {m: (model.input_tokens[m], model.input_dims[m]) for m in cfg.model.modalities}
        feats = {m: Features(torch.randn(n, D), torch.randn(n, T, D), torch.ones(n, T, dtype=torch.bool))
                 for m, (T, D) in shapes.items()}
        return feats, {m: torch.randn(n, R, H) for m in cfg.model.modalities}
    (fit, fit_tokens), (select, select_tokens) = split(args.n_fit), split(args.n_fit // 8)
    tokens = {"fit": fit_tokens, "select": select_tokens}
    sides = {"sliced": lambda: solved_maps(model, fit, select, tokens, sliced=not args.off),
             "each k": lambda: solved_maps(model, fit, select, tokens, sliced=False)}
    times, out = timing.interleaved(sides, args.rounds, warm_up=False)
    gap = max(float((out["sliced"][key] - value).abs().max() / value.abs().max())
              for key, value in out["each k"].items())
    print(f"read-out solve, {args.n_fit} fit rows: sliced products {timing.median_time(times['sliced'])} CPU, products "
          f"at each k {timing.median_time(times['each k'])} CPU: {timing.spread(times['each k'], times['sliced'])} "
          f"(largest map difference {gap:.1e} of the largest entry)", flush=True)


if __name__ == "__main__":
    main()
