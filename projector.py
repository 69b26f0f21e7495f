"""The projector: phase-1 tokens into the decoder's embedding space, one per image modality, whitened by the training
split's statistics."""
from __future__ import annotations

import torch
import torch.nn as nn

from llm_config import PROJECTORS


# Whitening's floor on a direction's variance, as a fraction of the register's mean variance: it caps a direction's
# gain at 1/sqrt(floor) that of a direction of mean variance, so noise is not blown up. Validation split, touch-only
# captions: 0.1 read 0.96 at k = 16 after 15 epochs where 0.01 read 0.94; after 12 epochs 0.1 read 0.89-0.90 at
# k <= 4 where 1 read 0.81-0.82
WHITENING_FLOOR = 0.1


class Projector(nn.Module):
    """Phase-1 tokens (width dim_in) → decoder embeddings (dim_out), one each: `linear`, or LLaVA's
    `mlp2x_gelu`, plus a learned embedding per register slot, so the decoder knows which register (of
    which modality: each has its own projector) it reads wherever the token lands in the sequence."""

    def __init__(self, kind: str, dim_in: int, dim_out: int, n_tokens: int, standardize: bool | str = False):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(dim_in, dim_out)
        elif kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(dim_in, dim_out), nn.GELU(), nn.Linear(dim_out, dim_out))
        else:
            raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTORS}")
        self.slots = nn.Parameter(torch.randn(n_tokens, dim_out) * 0.02)
        # `standardize` (LLMConfig.standardize_tokens): tokens centred by `shift` and rescaled by `scale` per
        # register: True scales each channel (scale R×dim_in), "whiten" multiplies by a whitening matrix (scale
        # R×dim_in×dim_in). Fit to the training split by `fit_statistics`, then fixed, as a probe's StandardScaler
        # is; the checkpoint keeps them (MultimodalLLM.fitted_tensors). Trained along, AdamW's steps of about lr
        # on every entry undid the whitening (validation, 15 epochs: touch-only captions at k <= 4 0.84-0.86,
        # fixed 0.90-0.91).
        if standardize:
            self.register_buffer("shift", torch.zeros(n_tokens, dim_in))
            self.register_buffer("scale", torch.eye(dim_in).repeat(n_tokens, 1, 1) if standardize == "whiten"
                                 else torch.ones(n_tokens, dim_in))
        else:
            self.shift = self.scale = None
        self.dim_in, self.dim_out = dim_in, dim_out

    @torch.no_grad()
    def fit_statistics(self, tokens: torch.Tensor):
        """Fit shift and scale to `tokens` (N×R×dim_in). Per channel: mean 0, std 1, as a linear probe's
        StandardScaler does, so that a channel's small variance does not hide what it holds. Whitening: every
        direction of a register's channels at about unit variance (ZCA: the eigenvectors of the covariance kept,
        each eigenvalue λ scaled by 1 / sqrt(λ + WHITENING_FLOOR · mean λ), so directions of near-zero variance
        are not blown up). What a register holds in a combination of channels of small variance is then as
        loud as the rest, which is what lets the decoder learn it in a few epochs (configs/phase2.yaml)."""
        self.shift.copy_(tokens.mean(0))
        if self.scale.dim() == 2:
            self.scale.copy_(1 / tokens.std(0).clamp_min(1e-6))
            return
        centred = (tokens - self.shift).double()
        covariance = torch.einsum("nrd,nre->rde", centred, centred) / max(len(tokens) - 1, 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(0) + WHITENING_FLOOR * eigenvalues.mean(-1, keepdim=True) + 1e-12
        self.scale.copy_((vectors * eigenvalues.rsqrt()[:, None, :]) @ vectors.transpose(1, 2))

    def forward(self, tokens: torch.Tensor, index: list[int]) -> torch.Tensor:
        """tokens B×R×dim_in → B×len(index)×dim_out for registers `index`."""
        tokens = tokens[:, index]
        if self.shift is not None:
            centred = tokens - self.shift[index]
            tokens = (torch.einsum("brd,rde->bre", centred, self.scale[index]) if self.scale.dim() == 3
                      else centred * self.scale[index])
        return self.net(tokens) + self.slots[index]
