"""The preservation decoder's queries attend to each other once per batch: core.FeatureDecoder against the same
weights run the obvious way, one copy of the queries per sample through every block. Forward and backward at
the testbed's config (64 queries rebuilding 64 feature tokens of width 128 from 16 registers, batch 64) and at
the seed config (257 tokens of width 1024, 32 registers, hidden 512), in the same run, with the outputs
checked equal.

    python bench/bench_decoder.py [--seconds 10] [--threads 1]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
from bench_step import median_step_seconds  # noqa: E402


def one_copy_per_sample(decoder: core.FeatureDecoder, registers, keep):
    """The first implementation one would write: the queries expanded to the batch before the first block."""
    B, T = registers.shape[0], len(decoder.queries)
    x, allowed = decoder.queries.expand(B, -1, -1), keep[:, None, :].expand(B, T, keep.shape[1])
    for block in decoder.blocks:
        x = block(x, None, registers, allowed)
    return decoder.out(x)


def compare(what, hidden, output_dim, n_tokens, n_registers, n_heads, batch, seconds):
    torch.manual_seed(0)
    decoder = core.FeatureDecoder(hidden, output_dim, n_tokens, n_layers=1, n_heads=n_heads)
    registers = torch.randn(batch, n_registers, hidden, requires_grad=True)
    keep = torch.arange(n_registers)[None] < torch.randint(1, n_registers + 1, (batch,))[:, None]
    with torch.no_grad():  # the same computation up to float32 summation order
        torch.testing.assert_close(decoder(registers, keep), one_copy_per_sample(decoder, registers, keep),
                                   atol=1e-4, rtol=1e-3)

    def step(forward):
        return lambda: forward(registers, keep).pow(2).mean().backward()
    wall, cpu = median_step_seconds({"once": step(decoder), "copies": step(
        lambda r, k: one_copy_per_sample(decoder, r, k))}, seconds)
    print(f"{what}: queries once {cpu['once'] * 1e3:.1f} ms CPU ({wall['once'] * 1e3:.1f} wall), one copy per "
          f"sample {cpu['copies'] * 1e3:.1f} ms CPU ({wall['copies'] * 1e3:.1f} wall): "
          f"{cpu['copies'] / cpu['once']:.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="CPU seconds of timing per config")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compare("testbed", 128, 128, 64, 16, 4, 64, args.seconds)
    compare("seed config", 512, 1024, 257, 32, 8, 8, args.seconds)


if __name__ == "__main__":
    main()
