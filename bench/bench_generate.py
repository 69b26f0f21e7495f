"""Caption generation speed: what the KV cache gains and what batching gains, apart and together, on the built-in
testbed decoder and on a decoder of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864;
random weights and the testbed's caption vocabulary of a few hundred tokens instead of Qwen's 151,936, since
nothing can be downloaded, so it has about 360M parameters rather than 494M; the script prints the count).

Four sides, every one greedy and of the same fixed length, each timed in CPU seconds in interleaved rounds:
  cached,   batched      MultimodalLLM.generate_from_tokens on all captions (what the workbook runs)
  cached,   per sample   the same, one caption per call
  uncached, batched      a hand-written greedy loop that runs the whole sequence through the decoder at every step
  uncached, per sample   that loop, one caption per call
transformers switches use_cache on whenever it generates from inputs_embeds, whatever it is told, so the uncached
sides cannot be `generate(use_cache=False)`: a forward hook on the decoder checks that they pass and get back no
past key values, and that the cached ones do. All four must write the same captions.

`--off` switches the cache off: the "cached" sides run the uncached loop too, so the cache's gain reads about 1.

    python bench/bench_generate.py [--n 32] [--new_tokens 16] [--n_qwen 4] [--new_tokens_qwen 8] [--rounds 3]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402
import llm_integration as L  # noqa: E402
import phase1  # noqa: E402
import timing  # noqa: E402

# Qwen/Qwen2.5-0.5B's config.json, but for the vocabulary
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)


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


@torch.no_grad()
def uncached_captions(mm: L.MultimodalLLM, tokens: dict[str, torch.Tensor], new_tokens: int) -> list[str]:
    """Greedy captions of exactly `new_tokens` tokens, recomputing the whole sequence at every step: the inputs
    generate_from_tokens builds, then one full forward per new token with use_cache=False. EOS is barred, as
    min_new_tokens bars it on the cached side."""
    source = mm.resolve(None)
    n = len(next(iter(tokens.values())))
    prefix, prefix_mask = mm.prefix(tokens, mm.keep_masks(source, n), source.groups)
    inputs = mm.assemble(prefix, prefix_mask, mm.llm_cfg.prompt, new_tokens=new_tokens)
    embeds, mask, positions = inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"]
    embed, written = mm.decoder.get_input_embeddings(), []
    for _ in range(new_tokens):
        logits = mm.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logits = logits[:, -1].float()
        logits[:, mm.tokenizer.eos_token_id] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        written.append(token)
        embeds = torch.cat([embeds, embed(token).to(embeds.dtype)], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return [c.strip() for c in mm.tokenizer.batch_decode(torch.cat(written, 1), skip_special_tokens=True)]


def cached_captions(mm: L.MultimodalLLM, tokens: dict[str, torch.Tensor], new_tokens: int) -> list[str]:
    return mm.generate_from_tokens(tokens, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def per_sample(captions):
    """`captions` called on one sample at a time."""
    def run(mm, tokens, new_tokens):
        n = len(next(iter(tokens.values())))
        return [c for i in range(n) for c in captions(mm, {m: t[i:i + 1] for m, t in tokens.items()}, new_tokens)]
    return run


def sides(off: bool) -> dict:
    """{(cache, batching): captions function}; with `off` the cached sides run the uncached loop."""
    cached = uncached_captions if off else cached_captions
    return {("cached", "batched"): cached, ("cached", "per sample"): per_sample(cached),
            ("uncached", "batched"): uncached_captions, ("uncached", "per sample"): per_sample(uncached_captions)}


class CacheWatch:
    """Counts the decoder's forwards that were given or returned past key values (a KV cache), and all forwards."""

    def __init__(self, decoder):
        self.cached = self.calls = 0
        self.handle = decoder.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.calls += 1
        self.cached += kwargs.get("past_key_values") is not None or getattr(output, "past_key_values", None) is not None

    def __call__(self, fn):
        """fn() and whether any decoder forward during it used a KV cache."""
        before, calls = self.cached, self.calls
        out = fn()
        if self.calls == calls:
            raise RuntimeError("the decoder never ran: the hook sits on the wrong module")
        return out, self.cached > before


def compare(mm: L.MultimodalLLM, n: int, new_tokens: int, rounds: int, off: bool, name: str) -> dict:
    """Time the four sides; check the captions agree and which sides used a KV cache. Returns {side: used cache}."""
    torch.manual_seed(0)
    tokens = {m: torch.randn(n, mm.n_registers, mm.aligner.model.design.token_width) for m in mm.modalities}
    runs = {side: (lambda fn=fn: fn(mm, tokens, new_tokens)) for side, fn in sides(off).items()}
    watch = CacheWatch(mm.decoder)
    used = {side: watch(run)[1] for side, run in runs.items()}
    watch.handle.remove()
    for side in runs:
        if used[side] != (side[0] == "cached" and not off):
            raise RuntimeError(f"{side} {'used' if used[side] else 'did not use'} a KV cache")
    times, captions = timing.interleaved(runs, rounds, warm_up=False)  # the hook's pass above warmed every side up
    if len({tuple(c) for c in captions.values()}) != 1:
        raise RuntimeError(f"the four sides wrote different captions: {captions}")
    prefix = mm.n_registers * len(mm.modalities)
    print(f"decoder {name}: {n} captions × {new_tokens} tokens, prefix {prefix} tokens; the same captions on all "
          f"four sides; a KV cache on {[' '.join(s) for s, u in used.items() if u] or 'none'} (forward hook)")
    for side, t in times.items():
        print(f"  {' '.join(side):21s} {timing.median_time(t):>10s} CPU  {n * new_tokens / statistics.median(t):7.1f} "
              "tokens per CPU second")
    c, u = ("cached", "batched"), ("uncached", "batched")
    cs, us = ("cached", "per sample"), ("uncached", "per sample")
    print(f"  the cache's gain:  batched {timing.spread(times[u], times[c])}, per sample {timing.spread(times[us], times[cs])}")
    print(f"  batching's gain:   cached {timing.spread(times[cs], times[c])}, uncached {timing.spread(times[us], times[u])}")
    print(f"  both together:     {timing.spread(times[us], times[c])}", flush=True)
    return used


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="captions to generate on the testbed decoder")
    parser.add_argument("--new_tokens", type=int, default=16, help="tokens per caption (EOS is barred)")
    parser.add_argument("--n_qwen", type=int, default=4, help="captions on the Qwen2.5-0.5B-shaped decoder")
    parser.add_argument("--new_tokens_qwen", type=int, default=8, help="tokens per caption there")
    timing.add_arguments(parser, "the cached sides run the uncached loop")
    args = parser.parse_args()
    timing.start(args)
    cfg = phase1.load_config()  # the testbed's phase-1 shape; weights do not matter for speed
    torch.manual_seed(0)
    aligner = core.Aligner({m: phase1.get_encoder(cfg, m) for m in cfg.model.modalities}, phase1.build_model(cfg))
    compare(L.MultimodalLLM(aligner, L.LLMConfig()).eval(), args.n, args.new_tokens, args.rounds, args.off,
            L.LLMConfig().model_name)
    with tempfile.TemporaryDirectory() as folder:
        qwen_shaped_decoder(Path(folder))
        start = time.perf_counter()
        # full: the weights are random on purpose, so no "untrained decoder" warning; nothing trains here
        mm = L.MultimodalLLM(aligner, L.LLMConfig(model_name=folder, train_decoder="full")).eval()
        load = time.perf_counter() - start
        params = sum(p.numel() for p in mm.decoder.parameters())
        embedding = mm.decoder.get_input_embeddings().weight
        print(f"Qwen2.5-0.5B-shaped decoder: {params / 1e6:.0f}M parameters ({embedding.shape[0]}-token vocabulary, "
              f"embedding tied to the output; Qwen2.5-0.5B's 151,936-token vocabulary makes it 494M), loaded from its "
              f"folder in {load:.1f} s wall")
        compare(mm, args.n_qwen, args.new_tokens_qwen, args.rounds, args.off, "Qwen2.5-0.5B-shaped (random weights)")


if __name__ == "__main__":
    main()
