"""Phase-1 training step speed: the register module (core.RegisterTokenModule, joint attention) against the
obvious first implementation a researcher would write, `nn.TransformerEncoder` with a boolean mask over
[features | registers], at the same config and in the same run (the ratio is what counts). A step is forward,
backward and an AdamW step, each side with its own optimizer as it would be written: loop.make_optimizer for
the register module, a plain torch.optim.AdamW for the reference. The cross-attention variant is timed too,
with --compile the joint module under torch.compile, and both joint implementations under bf16 autocast
(train.py's `cpu_bf16`; it pays only on CPUs with AVX-512 BF16 or AMX, and at widths where matrix products
dominate). Without those units bf16 is emulated, a step 10-30x slower than float32, so the bf16 rows are timed
only on CPUs that have them, or with --bf16. `--off` times the reference on both sides (the ratio reads about 1).

    python bench/bench_step.py [--seconds 10] [--seed_batch 16] [--bf16] [--compile] [--off]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import loop  # noqa: E402
import phase1  # noqa: E402
import timing  # noqa: E402


class PlainRegisters(nn.Module):
    """The reference: the same computation as RegisterTokenModule(attention="joint"), written with
    nn.TransformerEncoder over [features | registers] and a boolean mask that hides the registers from the
    features and later registers from earlier ones."""

    def __init__(self, input_dim, num_input_tokens, hidden_dim, n_registers, n_layers, n_heads):
        super().__init__()
        self.in_proj = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden_dim))
        self.feature_pos = nn.Parameter(torch.randn(num_input_tokens, hidden_dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(n_registers, hidden_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden_dim, n_heads, 4 * hidden_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, tokens, mask):
        B, T, _ = tokens.shape
        R = len(self.registers)
        x = torch.cat([self.in_proj(tokens) + self.feature_pos, self.registers.expand(B, R, -1)], 1)
        blocked = ~core.register_attention_mask(T, R, tokens.device)
        padding = ~torch.cat([mask, torch.ones(B, R, dtype=torch.bool, device=mask.device)], 1)
        return self.norm(self.encoder(x, mask=blocked, src_key_padding_mask=padding)[:, T:])


def copy_weights(plain: PlainRegisters, module: core.RegisterTokenModule):
    """The register module's weights into the reference (its key bias is zero), so their outputs can be compared."""
    with torch.no_grad():
        for name in ("in_proj.0.weight", "in_proj.0.bias", "in_proj.1.weight", "in_proj.1.bias", "feature_pos",
                     "registers", "norm.weight", "norm.bias"):
            plain.get_parameter(name).copy_(module.get_parameter(name))
        for layer, block in zip(plain.encoder.layers, module.blocks):
            a = block.attn
            layer.self_attn.in_proj_weight.copy_(torch.cat([a.q.weight, a.k.weight, a.v.weight]))
            layer.self_attn.in_proj_bias.copy_(torch.cat([a.q.bias, torch.zeros_like(a.q.bias), a.v.bias]))
            for mine, theirs in ((a.out, layer.self_attn.out_proj), (block.norm1, layer.norm1),
                                 (block.norm3, layer.norm2), (block.mlp[0], layer.linear1), (block.mlp[2], layer.linear2)):
                theirs.load_state_dict(mine.state_dict())


def step_fn(module, optimizer, tokens, mask, bf16=False):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(tokens, mask)
        loss = out.float().square().mean()  # any loss of every output: backward runs through all
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def step_flops(module, tokens, mask) -> int:
    """Floating-point operations of one forward + backward (matrix products and attention, as counted by
    torch.utils.flop_counter): the work a step cannot avoid, whatever kernels run it."""
    with FlopCounterMode(display=False) as counter:
        module(tokens, mask).square().mean().backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sides(plain, joint, cross, tokens, mask, bf16=False, off=False) -> dict:
    """{name: one training step}, each module with the optimizer it would be written with; with `off` the joint
    side (also under bf16) is the reference's own step, so both sides run the same code."""
    def timed(module, bf16=False):
        optimizer = (torch.optim.AdamW(module.parameters(), lr=1e-4) if module is plain
                     else loop.make_optimizer(module, 1e-4, 0.05, 0, 1)[0])
        return step_fn(module, optimizer, tokens, mask, bf16)

    steps = {"plain": timed(plain), "cross": timed(cross)}
    steps["joint"] = steps["plain"] if off else timed(joint)
    if bf16:
        steps["plain bf16"] = timed(plain, bf16=True)
        steps["joint bf16"] = steps["plain bf16"] if off else timed(joint, bf16=True)
    return steps


def compare(what, input_dim, n_tokens, hidden, n_registers, n_layers, n_heads, batch, seconds, rounds, bf16,
            compiled=False, off=False):
    torch.manual_seed(0)
    shape = (input_dim, n_tokens, hidden, n_registers, n_layers, n_heads)
    plain = PlainRegisters(*shape)
    joint, cross = core.RegisterTokenModule(*shape, "joint"), core.RegisterTokenModule(*shape, "cross")
    tokens, mask = torch.randn(batch, n_tokens, input_dim), torch.ones(batch, n_tokens, dtype=torch.bool)
    copy_weights(plain, joint)
    with torch.no_grad():
        difference = (plain(tokens, mask) - joint(tokens, mask)).abs().max().item()
    steps = sides(plain, joint, cross, tokens, mask, bf16, off)
    if compiled:  # its own copy of the weights and optimizer; the first call (compiling) is the warm-up
        copy = core.RegisterTokenModule(*shape, "joint")
        copy.load_state_dict(joint.state_dict())
        steps["joint compiled"] = step_fn(torch.compile(copy), loop.make_optimizer(copy, 1e-4, 0.05, 0, 1)[0], tokens, mask)
        start = time.perf_counter()
        steps["joint compiled"]()
        compile_seconds = time.perf_counter() - start
    times = timing.interleaved(steps, rounds, seconds)[0]
    cpu = {name: statistics.median(t) for name, t in times.items()}
    print(f"{what}: batch {batch}, {n_tokens} feature tokens × {input_dim}, hidden {hidden}, {n_layers} layers, "
          f"{n_heads} heads, {n_registers} registers; median CPU ms/step")
    for name, label in (("plain", "plain nn.TransformerEncoder + mask"), ("joint", "RegisterTokenModule, joint"),
                        ("cross", "RegisterTokenModule, cross"), ("joint compiled", "RegisterTokenModule, joint, compiled"),
                        ("plain bf16", "plain, bf16 autocast"),
                        ("joint bf16", "RegisterTokenModule, joint, bf16")):
        if name in steps:
            print(f"  {label:36s} {cpu[name] * 1e3:8.1f}")
    print(f"  same outputs with the same weights: largest difference {difference:.1e}")
    print(f"  speed-up joint vs plain: {timing.spread(times['plain'], times['joint'])}; cross costs "
          f"{timing.spread(times['cross'], times['joint'])} of joint")
    if compiled:
        print(f"  torch.compile: compiled joint vs joint {timing.spread(times['joint'], times['joint compiled'])}, vs "
              f"plain {timing.spread(times['plain'], times['joint compiled'])}; compiling took {compile_seconds:.0f} s wall")
    work = {name: step_flops(module, tokens, mask) for name, module in (("plain", plain), ("joint", joint), ("cross", cross))}
    print(f"  work per step (forward + backward): plain {work['plain'] / 1e9:.1f}, joint {work['joint'] / 1e9:.1f}, "
          f"cross {work['cross'] / 1e9:.1f} GFLOP; joint does {work['plain'] / work['joint']:.2f}x less than plain, "
          "so beyond that its speed-up can come only from running the same products faster")
    if bf16:
        print(f"  with bf16 autocast: joint bf16 vs plain {timing.spread(times['plain'], times['joint bf16'])}, "
              f"vs plain bf16 {timing.spread(times['plain bf16'], times['joint bf16'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="CPU seconds of timing per config, at least")
    parser.add_argument("--seed_batch", type=int, default=16, help="batch at the seed config")
    timing.add_arguments(parser, "the register module's side runs the reference")
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even on a CPU without bf16 units")
    parser.add_argument("--compile", action="store_true",
                        help="also time the joint module under torch.compile (compiling takes a minute or more)")
    args = parser.parse_args()
    timing.start(args)
    bf16 = args.bf16 or loop.cpu_has_bf16_units()
    if not bf16:
        print("bf16 autocast not timed: this CPU has no AVX-512 BF16 or AMX units, so bf16 is emulated (--bf16 times it)")
    cfg = phase1.load_config()
    m, enc = cfg.model, phase1.get_encoder(cfg, cfg.model.modalities[0])
    compare(f"testbed ({cfg.model.modalities[0]} features)", enc.dim, enc.num_tokens, m.hidden_dim,
            m.n_registers, m.n_layers, m.n_heads, cfg.batch_size, args.seconds, args.rounds, bf16, args.compile, args.off)
    compare("seed config", 1024, 257, 512, 32, 4, 8, args.seed_batch, args.seconds, args.rounds, bf16, args.compile,
            args.off)


if __name__ == "__main__":
    main()
