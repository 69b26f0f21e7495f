"""Caption generation speed: one batched, left-padded, KV-cached `generate` call against a per-sample
loop without a cache, on the built-in decoder, measured in the same run (the ratio is what counts).

    python bench/bench_generate.py [--n 64] [--new_tokens 24]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import llm_integration as L  # noqa: E402
import train  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="captions to generate")
    parser.add_argument("--new_tokens", type=int, default=24, help="tokens per caption (EOS is ignored)")
    args = parser.parse_args()
    cfg = train.load_config()  # the testbed's phase-1 shape; weights do not matter for speed
    torch.manual_seed(0)
    aligner = core.Aligner({m: train.get_encoder(cfg, m) for m in cfg.model.modalities}, train.build_model(cfg))
    mm = L.MultimodalLLM(aligner, L.LLMConfig()).eval()
    width = L.token_width(cfg.model)
    tokens = {m: torch.randn(args.n, aligner.model.n_tokens, width) for m in mm.modalities}
    # every caption runs the full length, so both ways do the same amount of decoding
    fixed = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    mm.generate_from_tokens({m: t[:2] for m, t in tokens.items()}, **fixed)  # warm-up
    batched, fast = timed(lambda: mm.generate_from_tokens(tokens, **fixed))
    looped, slow = timed(lambda: [c for i in range(args.n) for c in mm.generate_from_tokens(
        {m: t[i:i + 1] for m, t in tokens.items()}, use_cache=False, **fixed)])
    prefix = aligner.model.n_tokens * len(mm.modalities)
    print(f"{args.n} captions × {args.new_tokens} tokens, prefix {prefix} tokens, decoder {mm.llm_cfg.model_name}, "
          f"{torch.get_num_threads()} threads")
    print(f"per-sample loop, no KV cache: {slow:.2f} s")
    print(f"batched + KV cache:           {fast:.2f} s")
    print(f"speed-up: {slow / fast:.1f}x  (same captions: {batched == looped})")


if __name__ == "__main__":
    main()
