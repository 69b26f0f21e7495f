"""Caption generation speed: one batched, left-padded, KV-cached `generate` call against a per-sample loop
without a cache, measured in the same run (the ratio is what counts), on the built-in testbed decoder and on a
decoder of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864; random weights and the
testbed's vocabulary of about 400 tokens, since nothing can be downloaded), plus that decoder's time to a first caption:
loading it from its folder, then one caption.

    python bench/bench_generate.py [--n 64] [--new_tokens 24] [--n_qwen 4] [--new_tokens_qwen 12]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import llm_integration as L  # noqa: E402
import phase1  # noqa: E402

# Qwen/Qwen2.5-0.5B's config.json, but for the vocabulary
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def qwen_shaped_decoder(folder: Path) -> Path:
    """A random-init Qwen2ForCausalLM of Qwen2.5-0.5B's shape with the testbed decoder's tokenizer, saved as
    load_decoder reads a local folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = L.load_decoder(L.LLMConfig().model_name)[1]
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **QWEN25_05B)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def compare(mm: L.MultimodalLLM, n: int, new_tokens: int, name: str):
    torch.manual_seed(0)
    tokens = {m: torch.randn(n, mm.n_registers, mm.aligner.model.design.token_width) for m in mm.modalities}
    # every caption runs the full length, so both ways do the same amount of decoding
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    mm.generate_from_tokens({m: t[:2] for m, t in tokens.items()}, **fixed)  # warm-up
    batched, fast = timed(lambda: mm.generate_from_tokens(tokens, **fixed))
    looped, slow = timed(lambda: [c for i in range(n) for c in mm.generate_from_tokens(
        {m: t[i:i + 1] for m, t in tokens.items()}, use_cache=False, **fixed)])
    prefix = mm.n_registers * len(mm.modalities)
    print(f"decoder {name}: {n} captions × {new_tokens} tokens, prefix {prefix} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"  per-sample loop, no KV cache: {slow:8.2f} s  {n * new_tokens / slow:8.1f} tokens/s")
    print(f"  batched + KV cache:           {fast:8.2f} s  {n * new_tokens / fast:8.1f} tokens/s")
    print(f"  speed-up: {slow / fast:.1f}x  (same captions: {batched == looped})")
    return tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="captions to generate on the testbed decoder")
    parser.add_argument("--new_tokens", type=int, default=24, help="tokens per caption (EOS is ignored)")
    parser.add_argument("--n_qwen", type=int, default=4, help="captions on the Qwen2.5-0.5B-shaped decoder")
    parser.add_argument("--new_tokens_qwen", type=int, default=12, help="tokens per caption there")
    args = parser.parse_args()
    cfg = phase1.load_config()  # the testbed's phase-1 shape; weights do not matter for speed
    torch.manual_seed(0)
    aligner = core.Aligner({m: phase1.get_encoder(cfg, m) for m in cfg.model.modalities}, phase1.build_model(cfg))
    compare(L.MultimodalLLM(aligner, L.LLMConfig()).eval(), args.n, args.new_tokens, L.LLMConfig().model_name)
    with tempfile.TemporaryDirectory() as folder:
        qwen_shaped_decoder(Path(folder))
        # full: the weights are random on purpose, so no "untrained decoder" warning; nothing trains here
        mm, load = timed(lambda: L.MultimodalLLM(aligner, L.LLMConfig(model_name=folder, train_decoder="full")).eval())
        params = sum(p.numel() for p in mm.decoder.parameters()) / 1e6
        tokens = compare(mm, args.n_qwen, args.new_tokens_qwen, "Qwen2.5-0.5B-shaped (random weights)")
        _, first = timed(lambda: mm.generate_from_tokens({m: t[:1] for m, t in tokens.items()},
                                                         max_new_tokens=args.new_tokens_qwen,
                                                         min_new_tokens=args.new_tokens_qwen))
        print(f"  {params:.0f}M parameters; time to a first caption: loading the decoder {load:.1f} s + one caption "
              f"{first:.2f} s")


if __name__ == "__main__":
    main()
