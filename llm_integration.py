"""Phase 2: captions from any prefix of the register tokens, through a projector and a Qwen decoder.

    python llm_integration.py --phase1_run runs/phase1/default --output_dir runs/phase2/default
    python llm_integration.py --phase1_run RUN --output_dir OUT --model_name /models/Qwen2.5-1.5B-Instruct
    python llm_integration.py --phase1_run runs/phase1/default --output_dir runs/phase2/seeds --seeds 0 1 2
    torchrun --nproc_per_node=4 llm_integration.py --phase1_run runs/phase1/tvl --output_dir runs/phase2/tvl
    python llm_integration.py --phase1_run runs/phase1/default --output_dir runs/phase2/ablation --seeds 0 \
        --ablation --split val

The phase-1 model stays frozen. The first k tokens of the chosen modalities (a `TokenSource`) go through
a per-modality projector into the decoder's embedding space and are spliced into the user turn:
`[chat template head | prefix | prompt, template tail | caption, EOS]`, left-padded. The testbed decoder
is a small Qwen2 (random init, trained fully) with a tokenizer fitted offline on the training captions;
a real Qwen (by hub name or local folder) stays frozen and only the projector (optionally LoRA) trains.
Training runs through the one loop of loop.py, under torchrun with DDP as phase 1 does (each rank a share of every
batch; the loss the mean over all the batch's caption tokens); a run folder holds config.yaml, checkpoint/ (the
projector's and any trained decoder tensors in model.safetensors, state.pt), tokenizer/ (a built-in decoder's),
metrics.jsonl (with the validation split's numbers after every epoch: settings and epochs are chosen on them) and
caption_eval.json (the test split, for reporting; caption_eval_val.json with --split val). On SynthTouch every
evaluated token source carries the linear-probe ceiling of its very tokens beside its caption accuracy. `--seeds`
trains once per seed and writes mean and std over seeds (phase2_<split>.csv/.json); `--ablation` adds the settings
of ABLATIONS.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from caption_eval import EVAL_FILES, eval_file, probe_ceiling, probe_ceilings, source_features, split_factors
from captioner import MultimodalLLM
from config import Flag, HelpFormatter, add_config_flags, config_overrides, shipped_or_given
from llm_config import DECODER_TRAINING, DEFAULT_CONFIG, LLMConfig, PROJECTORS, ROOT, load_llm_config
from phase2 import ABLATIONS, VALIDATION_REFERENCE, ensure_phase2, on_phase1_run, run_phase2, seed_statistics
from phase2_run import run_folder
from phase2_train import encode_tokens, fit_captioner, validation_numbers
from projector import Projector, WHITENING_FLOOR
from seed_api import train_captioning
from text_decoder import (PROMPTS, TINY_DECODERS, TOKENIZER_CAPTIONS, build_caption_tokenizer, caption_tokenizer,
                          load_decoder, save_tiny_decoder)
from token_sources import IMAGE_MODALITIES, REGISTER_GROUPS, TokenSource, prefix_grid


FLAGS = {
    "epochs": Flag("epochs", int, "passes over the phase-1 run's training split"),
    "batch_size": Flag("batch_size", int, "captions per step"),
    "lr": Flag("lr", float, "peak learning rate of AdamW (warm-up, then cosine decay)"),
    "seed": Flag("seed", int, "seed of the projector's (and a built-in decoder's) initial weights and the batch order"),
    "model_name": Flag("model_name", str, f"the decoder: a built-in testbed one {tuple(TINY_DECODERS)}, a hub name "
                       "(Qwen/Qwen2.5-1.5B-Instruct) or a local folder"),
    "projector": Flag("projector", str, "phase-1 tokens to decoder embeddings", PROJECTORS),
    "train_decoder": Flag("train_decoder", str, "what of the decoder trains (auto: all of a built-in decoder, none "
                          "of a pretrained one)", DECODER_TRAINING),
    "prompt": Flag("prompt", str, "the user turn after the image tokens"),
    "max_new_tokens": Flag("max_new_tokens", int, "longest caption generated, in the decoder's tokens (None: the "
                           "longest training caption plus a quarter)"),
    "min_steps": Flag("min_steps", int, "a small dataset still trains this many steps: each epoch passes over it as "
                      "often as that takes (0: once)"),
    "k": Flag("source.k", int, "train and caption from at most the first k tokens of each modality (None: all)"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--phase1_run", required=True, default=argparse.SUPPRESS,
                        help="a phase-1 run folder (train.py's --output_dir)")
    parser.add_argument("--output_dir", required=True, default=argparse.SUPPRESS, help="the phase-2 run folder")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG.relative_to(ROOT), help="phase-2 YAML")
    add_config_flags(parser, FLAGS, load_llm_config(None), str(DEFAULT_CONFIG.relative_to(ROOT)))
    parser.add_argument("--modalities", nargs="+", choices=IMAGE_MODALITIES,
                        help="the modalities whose tokens the decoder reads (config key source.modalities); None: "
                             "every image modality of the phase-1 run")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    parser.add_argument("--split", choices=list(EVAL_FILES), default="test",
                        help="evaluate on val (to choose settings and epochs) or test (to report)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="train once per seed (output_dir/<setting>/seed<s>) and write mean ± std over seeds to "
                             "output_dir/phase2_<split>.csv and .json")
    parser.add_argument("--ablation", action="store_true",
                        help="with --seeds: every setting of llm_integration.ABLATIONS on top of the config")
    args = parser.parse_args(argv)
    overrides = config_overrides(args, FLAGS)
    config = shipped_or_given(args.config)
    if args.modalities and "source.modalities" in overrides:
        raise SystemExit("--modalities and --set source.modalities both set the token source's modalities: keep one")
    if args.modalities:
        overrides["source.modalities"] = tuple(args.modalities)
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    if args.ablation and not args.seeds:
        raise SystemExit("--ablation trains every setting once per seed: add --seeds (e.g. --seeds 0)")
    if args.seeds:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise SystemExit("--seeds trains its runs one after another in one process, not under torchrun: train each "
                             "seed as a torchrun job of its own (--seed S --output_dir OUT/config/seedS), then run --seeds "
                             "without torchrun on OUT, which reuses those runs")
        if args.resume or args.overwrite:
            raise SystemExit("--seeds reuses finished runs and resumes interrupted ones by itself; drop "
                             "--resume/--overwrite (or choose a new --output_dir)")
        settings = {"config": {}, **(ABLATIONS if args.ablation else {})}
        table = seed_statistics(args.phase1_run, args.output_dir, {
            name: load_llm_config(config, **{**overrides, **changes}) for name, changes in settings.items()},
            args.seeds, args.split)
        print(table.to_string(index=False, float_format="%.3f"))
        print(f"wrote {Path(args.output_dir) / f'phase2_{args.split}.csv'} and .json")
        return
    result = run_phase2(args.phase1_run, args.output_dir, load_llm_config(config, **overrides), args.resume,
                        overwrite=args.overwrite, split=args.split)
    if not result:  # a torchrun rank other than 0
        return
    for row in result["rows"]:
        accuracy = row.get("accuracy", row.get("caption accuracy"))  # attributes (SynthTouch), else exact captions
        print(f"{row['modalities']:>13} k={row['k']:<3} accuracy {accuracy:.3f}  "
              f"BLEU-4 {row['bleu4']:.3f}  CIDEr-D {row['cider_d']:.3f}")
    print(f"wrote {eval_file(args.output_dir, args.split)}")


if __name__ == "__main__":
    main()
