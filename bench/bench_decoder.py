"""The preservation decoder's queries attend to each other once per batch: core.FeatureDecoder against the same
weights run the obvious way, one copy of the queries per sample through every block. Forward and backward at
the testbed's config (64 queries rebuilding 64 feature tokens of width 128 from 16 registers, batch 64) and at
the seed config (257 tokens of width 1024, 32 registers, hidden 512), in the same run, with the outputs
checked equal. `--off` runs one copy per sample on both sides (the ratio reads about 1).

Then, a measurement only (nothing here changes the model): the decoder's share of a whole testbed phase-1 step
(forward + backward of configs/default.yaml's model with and without the preservation loss), and what rebuilding a
quarter of the positions (16 of 64) would cost against all of them, the option a sampled-subset preservation
loss would take if the study's numbers held with it.

    python bench/bench_decoder.py [--seconds 5] [--threads 1] [--off]
"""
import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import phase1  # noqa: E402
import timing  # noqa: E402
from features import Features  # noqa: E402


def one_copy_per_sample(decoder: core.FeatureDecoder, registers, keep):
    """The first implementation one would write: the queries expanded to the batch before the first block."""
    B, T = registers.shape[0], len(decoder.queries)
    x, allowed = decoder.queries.expand(B, -1, -1), keep[:, None, :].expand(B, T, keep.shape[1])
    for block in decoder.blocks:
        x = block(x, None, registers, allowed)
    return decoder.out(x)


def sides(decoder: core.FeatureDecoder, registers, keep, off=False) -> dict:
    """{name: forward + backward}; with `off` the queries-once side is the one-copy-per-sample step."""
    def step(forward):
        return lambda: forward(registers, keep).pow(2).mean().backward()
    copies = step(lambda r, k: one_copy_per_sample(decoder, r, k))
    return {"once": copies if off else step(decoder), "copies": copies}


def compare(what, hidden, output_dim, n_tokens, n_registers, n_heads, batch, seconds, rounds, off=False):
    torch.manual_seed(0)
    decoder = core.FeatureDecoder(hidden, output_dim, n_tokens, n_layers=1, n_heads=n_heads)
    registers = torch.randn(batch, n_registers, hidden, requires_grad=True)
    keep = torch.arange(n_registers)[None] < torch.randint(1, n_registers + 1, (batch,))[:, None]
    with torch.no_grad():  # the same computation up to float32 summation order
        torch.testing.assert_close(decoder(registers, keep), one_copy_per_sample(decoder, registers, keep),
                                   atol=1e-4, rtol=1e-3)

    times = timing.interleaved(sides(decoder, registers, keep, off), rounds, seconds)[0]
    print(f"{what}: queries once {timing.median_time(times['once'])} CPU, one copy per sample "
          f"{timing.median_time(times['copies'])} CPU: {timing.spread(times['copies'], times['once'])}", flush=True)


def share_of_a_step(seconds, rounds, positions=16):
    """The preservation decoder's share of a testbed phase-1 step, and a decoder of `positions` queries against
    one of every feature token (forward + backward, CPU time)."""
    cfg = phase1.load_config()
    encoders = {m: phase1.get_encoder(cfg, m) for m in cfg.model.modalities}
    dims, n_tokens = {m: e.dim for m, e in encoders.items()}, {m: e.num_tokens for m, e in encoders.items()}
    torch.manual_seed(0)
    batch = {m: Features(torch.randn(cfg.batch_size, dims[m]), torch.randn(cfg.batch_size, n_tokens[m], dims[m]),
                         torch.ones(cfg.batch_size, n_tokens[m], dtype=torch.bool)) for m in cfg.model.modalities}
    models = {}
    for name, weight in (("with", cfg.model.preservation_weight), ("without", 0.0)):
        torch.manual_seed(0)
        models[name] = core.AlignmentModel(dataclasses.replace(cfg.model, preservation_weight=weight), dims, n_tokens).train()
    steps = {name: (lambda model=model: model(batch)[0].backward()) for name, model in models.items()}
    m = cfg.model
    T, width = n_tokens[m.modalities[0]], dims[m.modalities[0]]
    registers = torch.randn(cfg.batch_size, m.n_registers, m.hidden_dim, requires_grad=True)
    keep = torch.arange(m.n_registers)[None] < torch.randint(1, m.n_registers + 1, (cfg.batch_size,))[:, None]
    for name, count in (("all positions", T), ("subset", positions)):
        decoder = core.FeatureDecoder(m.hidden_dim, width, count, m.decoder_layers, m.n_heads)
        steps[name] = lambda decoder=decoder: decoder(registers, keep).pow(2).mean().backward()
    times = timing.interleaved(steps, rounds, seconds)[0]
    print(f"testbed phase-1 step (forward + backward, batch {cfg.batch_size}, {len(m.modalities)} modalities): "
          f"{timing.median_time(times['with'])} CPU with the preservation decoder, "
          f"{timing.median_time(times['without'])} without: {timing.spread(times['with'], times['without'])}; the "
          f"decoders are {1 - statistics.median(times['without']) / statistics.median(times['with']):.0%} of the step")
    print(f"  one modality's decoder rebuilding {positions} of {T} positions instead of all: "
          f"{timing.median_time(times['subset'])} against {timing.median_time(times['all positions'])} CPU, "
          f"{timing.spread(times['all positions'], times['subset'])} (measured only; the model rebuilds all {T})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5, help="CPU seconds of timing per config, at least")
    timing.add_arguments(parser, "the queries-once side runs one copy per sample")
    args = parser.parse_args()
    timing.start(args)
    compare("testbed", 128, 128, 64, 16, 4, 64, args.seconds, args.rounds, args.off)
    compare("seed config", 512, 1024, 257, 32, 8, 8, args.seconds, args.rounds, args.off)
    share_of_a_step(args.seconds, args.rounds)


if __name__ == "__main__":
    main()
