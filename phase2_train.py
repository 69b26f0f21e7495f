"""Phase-2 training on precomputed phase-1 tokens, through the one loop of loop.py (`fit_captioner`), with the
validation split's numbers after every epoch (`validation_numbers`)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

import alignment
import information
import loop
from captioner import MultimodalLLM
from phase2_run import RESUME_IGNORES, run_folder
from captions import attribute_accuracy
from features import Features
from token_sources import IMAGE_MODALITIES


@torch.no_grad()
def encode_tokens(model: alignment.AlignmentModel, feats: dict[str, Features],
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Phase-1 tokens of every sample, {modality: N×R×width}, on the CPU. Phase 1 is frozen, so phase 2
    trains on these instead of running the encoders and registers every step."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for m in IMAGE_MODALITIES:
        if m in feats and m in model.cfg.modalities:
            n = len(feats[m].pooled)
            out[m] = torch.cat([model.tokens(m, feats[m].batch(np.arange(i, min(i + batch_size, n)), device)).cpu()
                                for i in tqdm(range(0, n, batch_size), desc=f"{m} tokens", leave=False)])
    return out


def fit_captioner(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], captions: list[str],
                  output_dir: str | os.PathLike | None = None, resume: bool = False, callback=None,
                  extra: dict | None = None, overwrite: bool = False, val: tuple | None = None,
                  threads=None) -> list[dict]:
    """Train the projector (and the decoder, per train_decoder) to write `captions` from `tokens`, by the
    one loop of loop.py. With output_dir: a run folder (checkpoint after every epoch and on Ctrl-C,
    metrics.jsonl), `resume=True` continues it exactly, `overwrite=True` replaces it. `callback(row)`
    sees every metrics row. `val` = (tokens, captions, factors or None) of the validation split: every
    epoch row then gets its numbers (`validation_numbers`), the curve that epochs are chosen on. `threads()`: how
    many threads each step computes on (loop.fit)."""
    cfg = mm.llm_cfg
    loop.check_hyperparameters(cfg, "phase-2 config")
    dist = loop.Distributed()  # under torchrun: each rank trains on its share of every batch (DDP), rank 0 writes
    n = len(captions)
    wrong = {m: len(t) for m, t in tokens.items() if len(t) != n}
    if wrong:
        raise ValueError(f"{n} captions but token counts {wrong}; tokens and captions must be row-aligned")
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n} captions); "
                         f"use --batch_size {n} or less")
    run = None if output_dir is None else run_folder(output_dir, dist.main)
    # one trainer per run folder, checked before anything is built; loop.fit writes it
    with run.opened(mm.run_config(extra), resume, overwrite, RESUME_IGNORES) if run else contextlib.nullcontext() as opened:
        if not mm.trained:  # every rank fits the same tokenizer from the same captions; rank 0 saves it
            mm.fit_vocabulary(captions, None if run is None else run.path, resume, save=dist.main)
        longest = max(len(ids) for ids in mm.tokenizer(list(captions), add_special_tokens=False)["input_ids"])
        if cfg.max_new_tokens is None:
            mm.llm_cfg = cfg = dataclasses.replace(cfg, max_new_tokens=math.ceil(1.25 * longest))
        elif cfg.max_new_tokens < longest:
            warnings.warn(f"max_new_tokens {cfg.max_new_tokens} is shorter than the longest training caption ({longest} "
                          f"tokens of {cfg.model_name}'s tokenizer): generated captions that long are cut off and count as "
                          f"wrong. Set max_new_tokens to {longest} or more (--max_new_tokens, or leave it unset: it then "
                          "follows the captions)")
        if opened is not None:  # the config as trained, max_new_tokens fixed, so the run captions alike when loaded
            opened.config = mm.run_config(extra)
        if cfg.standardize_tokens and not resume:  # a resumed run loads its own
            for m, projector in mm.projector.items():
                if m in tokens:
                    projector.fit_statistics(tokens[m])
        mm.trained = True
        # some batches leave a projector unused (k = 0 rows, one modality's rows): DDP must not wait for its gradient
        ddp = torch.nn.parallel.DistributedDataParallel(mm, find_unused_parameters=True) if dist.world > 1 else mm
        index_batches = loop.index_batches(n, cfg.batch_size, cfg.seed)
        # a small dataset: each epoch passes over it as often as it takes to train min_steps steps in all (checkpoints and
        # validation stay once an epoch; one pass, as before, wherever epochs x batches reach min_steps)
        passes = max(1, math.ceil(cfg.min_steps / (cfg.epochs * steps_per_epoch)))
        sources = {}  # pass -> every sample's token source, drawn up front so a resumed epoch sees the same

        def batches(epoch):
            return [(epoch * passes + p, index) for p in range(passes) for index in index_batches(epoch * passes + p)]

        def loss_fn(batch):
            draw, index = batch
            if draw not in sources:
                sources.clear()
                sources[draw] = mm.training_keep_masks(n, torch.Generator().manual_seed(cfg.seed * 100_003 + draw))
            index = dist.local_slice(index)
            keep = {m: k[index] for m, k in sources[draw].items()}
            total, counted = ddp({m: t[index] for m, t in tokens.items()}, [captions[i] for i in index], keep)
            return dist.global_mean(total, counted), {}

        epoch_end = None if val is None or not dist.main else lambda epoch: validation_numbers(mm, *val)
        return loop.fit(mm, loss_fn, batches, steps_per_epoch * passes, cfg, opened, epoch_end=epoch_end,
                        callback=callback, desc="phase 2 · captioning", rank=dist.rank, threads=threads)


@torch.no_grad()
def validation_numbers(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], captions: list[str],
                       factors: list[dict] | None = None, batch_size: int = 256) -> dict[str, float]:
    """The caption loss from the full token source (teacher-forced; batch means weighted by rows), and with
    SynthTouch factors the attribute accuracy of greedy captions from it, per group: what settings and
    epochs are chosen on."""
    was_training = mm.training
    mm.eval()
    n, total = len(captions), 0.0
    for start in range(0, n, batch_size):
        chunk = {m: t[start:start + batch_size] for m, t in tokens.items()}
        rows = captions[start:start + batch_size]
        total += mm.loss(chunk, rows, mm.keep_masks(mm.source, len(rows))).item() * len(rows)
    out = {"val loss": total / n}
    if factors is not None:
        accuracy = attribute_accuracy(mm.generate_from_tokens(tokens, mm.source), factors)
        out.update({f"val {k}": accuracy[f"{k}"]
                    for k in ("accuracy", *(f"accuracy {g}" for g in information.GROUP_ORDER))})
    mm.train(was_training)
    return out
