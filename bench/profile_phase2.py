"""Where a phase-2 epoch's time goes, on a trained phase-1 run: the parts of one training step (projected
prefix, decoder inputs, decoder forward, the whole step with backward and AdamW; fp32 and with CPU bf16
autocast) and the validation pass that follows every epoch, in milliseconds on one batch; then one epoch of
training with whole batches against the same batches in length chunks (`length_chunks`), back to back, as
ratios; with several thread counts, last, one epoch of configs/phase2.yaml's training at each (its `cpu_threads`
lifted), as ratios: under make's OMP_WAIT_POLICY=PASSIVE the tiny decoder's step is slower on two threads.

    python bench/profile_phase2.py --phase1_run runs/phase1/default [--threads 1 2] [--batch_size 64]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm_integration as L  # noqa: E402
import phase1  # noqa: E402


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase1_run", default="runs/phase1/default")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="the parts at the first; epochs at each")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads[0])
    aligner = phase1.load_aligner(args.phase1_run)
    cfg = phase1.load_config(Path(args.phase1_run) / "config.yaml")
    (train_set, train_feats), (val_set, val_feats) = phase1.split_data(cfg, "train"), phase1.split_data(cfg, "val")
    tokens, val_tokens = L.encode_tokens(aligner.model, train_feats), L.encode_tokens(aligner.model, val_feats)
    llm_cfg = L.load_llm_config(None, batch_size=args.batch_size, length_chunks=1)
    mm = L.MultimodalLLM(aligner, llm_cfg).train()
    optimizer = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=llm_cfg.lr)
    index = torch.arange(args.batch_size)
    batch = {m: t[index] for m, t in tokens.items()}
    captions = train_set.captions[:args.batch_size]
    keep = {m: k[index] for m, k in mm.training_keep_masks(len(train_set), torch.Generator().manual_seed(0)).items()}
    prefix, prefix_mask = mm.prefix(batch, keep, mm.source.groups)
    inputs = mm.assemble(prefix, prefix_mask, llm_cfg.prompt, captions)

    def step(bf16: bool):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = mm.loss(batch, captions, keep)
        loss.backward()
        optimizer.step()

    decoder = mm.decoder.config
    print(f"decoder: {decoder.num_hidden_layers} layers, hidden {decoder.hidden_size}, vocabulary {decoder.vocab_size}; "
          f"batch {tuple(inputs['inputs_embeds'].shape[:2])} (rows × positions); {args.threads[0]} thread(s)")
    parts = {"projected prefix": lambda: mm.prefix(batch, keep, mm.source.groups),
             "decoder inputs": lambda: mm.assemble(prefix, prefix_mask, llm_cfg.prompt, captions),
             "decoder forward": lambda: mm.decoder(**inputs, use_cache=False).loss,
             "training step (fp32)": lambda: step(False),
             "training step (bf16 autocast)": lambda: step(True)}
    for name, fn in parts.items():
        print(f"{name:32s} {per_call_ms(fn, args.repeats):8.1f} ms")
    steps = len(train_set) // args.batch_size
    start = time.perf_counter()
    L.validation_numbers(mm, val_tokens, val_set.captions, L.split_factors(val_set))
    print(f"{'validation after an epoch':32s} {(time.perf_counter() - start) * 1000:8.1f} ms "
          f"({steps} training steps per epoch)")
    settings = {"whole batches": {"length_chunks": 1},
                **{f"{n} length chunks": {"length_chunks": n} for n in (2, 4, 8)}}
    seconds = {}
    for name, setting in settings.items():
        model = L.MultimodalLLM(aligner, L.load_llm_config(None, batch_size=args.batch_size, epochs=1, **setting))
        start = time.perf_counter()
        L.fit_captioner(model, tokens, train_set.captions)
        seconds[name] = time.perf_counter() - start
        print(f"one training epoch, {name}: {seconds[name]:.1f} s, "
              f"{seconds['whole batches'] / seconds[name]:.2f}x", flush=True)
    if len(args.threads) > 1:
        by_threads = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            model = L.MultimodalLLM(aligner, L.load_llm_config(None, batch_size=args.batch_size, epochs=1))
            start = time.perf_counter()
            L.fit_captioner(model, tokens, train_set.captions)
            by_threads[threads] = time.perf_counter() - start
            print(f"one training epoch (configs/phase2.yaml) on {threads} thread(s): {by_threads[threads]:.1f} s, "
                  f"{by_threads[args.threads[0]] / by_threads[threads]:.2f}x the speed on {args.threads[0]}", flush=True)


if __name__ == "__main__":
    main()
