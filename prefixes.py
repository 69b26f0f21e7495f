"""Every prefix of k tokens from one forward pass per modality: the prefix lengths a model is evaluated at
(`prefix_ks`), and `encode` / `encode_all`, every register output, the shared embedding of every prefix length k and
the preservation cosine for every k (`Encoded`), which retrieval, the probes and the k slider all read.

Because register i never attends to registers after it (registers.register_attention_mask), the first k
outputs of one pass with all registers equal a pass that only has k registers; `encode(one_pass=False)`
runs those truncated passes, as the reference the tests and bench/bench_eval.py compare against.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import alignment
from features import Features


def prefix_ks(model: alignment.AlignmentModel, ks=None) -> list[int]:
    """The prefix lengths to evaluate: the model's 1, 2, 4, ..., n_registers grid, or `ks` checked."""
    default = model.design.prefix_lengths
    if ks is None:
        return default
    ks = sorted({int(k) for k in ks})
    bad = [k for k in ks if not 1 <= k <= model.n_tokens]
    if bad:
        raise ValueError(f"prefix lengths {bad} are outside 1..{model.n_tokens}, the number of tokens of this "
                         f"{model.cfg.design} model; pass ks=None for its grid {default}")
    return ks


class Encoded(NamedTuple):
    tokens: torch.Tensor | None  # N×R×hidden, every register output (None for truncated passes)
    embeddings: dict[int, torch.Tensor]  # k → N×embed_dim, un-normalised shared embedding of the first k tokens
    recon: dict[int, torch.Tensor] | None  # k → N preservation cosine (None without a preservation decoder)


@torch.no_grad()
def encode(model: alignment.AlignmentModel, modality: str, features: Features, ks: list[int],
           batch_size: int = 256, one_pass: bool = True, progress: bool = False, reconstruct: bool = True) -> Encoded:
    """Everything evaluation needs for one modality, on the CPU. `one_pass=False` runs the register
    module once per k with only k registers (the slow reference); `reconstruct=False` skips the
    preservation decoder (probes need only tokens and embeddings)."""
    device = next(model.parameters()).device
    n = len(features.pooled)
    has_decoder = hasattr(model, "decoders") and reconstruct
    centre = features.mean_token().to(device) if has_decoder else None
    tokens, embeddings, recon = [], {k: [] for k in ks}, {k: [] for k in ks}
    for start in tqdm(range(0, n, batch_size), desc=f"encode {modality}", disable=not progress, leave=False):
        feats = features.batch(np.arange(start, min(start + batch_size, n)), device)
        if one_pass or not model.design.has_registers:
            out = model.tokens(modality, feats)
            tokens.append(out.cpu())
            per_k = {k: out for k in ks}
        else:
            per_k = {k: model.tokens(modality, feats, n_registers=k) for k in ks}
        for k, out in per_k.items():
            embeddings[k].append(model.prefix_embeddings(modality, out, [k])[k].cpu())
            if has_decoder:
                recon[k].append(model.reconstruction_cosine(modality, out, feats, [k], centre)[k].cpu())
    return Encoded(torch.cat(tokens) if tokens else None,
                   {k: torch.cat(v) for k, v in embeddings.items()},
                   {k: torch.cat(v) for k, v in recon.items()} if has_decoder else None)


def encode_all(model, features: dict[str, Features], ks, batch_size=256, one_pass=True,
               progress=False, reconstruct=True) -> dict[str, Encoded]:
    """`encode` for every modality of the model, in eval mode (the model's mode is restored after)."""
    missing = [m for m in model.cfg.modalities if m not in features]
    if missing:
        raise ValueError(f"features lack modalities {missing} of this model (it aligns {model.cfg.modalities}); "
                         "pass features for every modality, e.g. from phase1.split_data(cfg, 'test')")
    sizes = {m: len(features[m].pooled) for m in model.cfg.modalities}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"modalities have different numbers of samples {sizes}; retrieval needs paired rows")
    was_training = model.training
    model.eval()
    try:
        return {m: encode(model, m, features[m], ks, batch_size, one_pass, progress, reconstruct)
                for m in model.cfg.modalities}
    finally:
        model.train(was_training)
