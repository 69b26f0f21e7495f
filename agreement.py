"""The agreed subspace: the shared embedding kept to the directions along which the modalities agree, fit in closed
form at the end of training (ModelConfig.shared_agreement).

Why: contrastive training shapes only the directions it uses. On the testbed the default's 128-number shared
embedding held 99 % of its variance in 9 directions, and the other 119, a hundredth of the variance, still said
which lighting a picture had and which pressure a touch: a probe standardises them back up (lighting read at 0.94
from all directions, 0.14 from the leading 8). A narrower embedding trained as such kept them in its few numbers
instead. So the directions are chosen after training, by how well the modalities agree along them: for the
training pairs' L2-normalised embeddings, the generalised eigenvectors of the covariance of their mean against the
covariance of their differences, each kept where the modalities' coordinates along it correlate at least at the
threshold. The coordinates are scaled to unit disagreement, so cosine retrieval weighs each direction by how
surely the modalities agree on it. The tokens and the embedding head stay as training made them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F



class AgreedSubspace(nn.Module):
    """(unit embedding − mean) @ basis: embed_dim × embed_dim, its columns past the kept directions zero. Until it is
    fit it is the identity (mean 0, basis I), so training and its validation read the unit embedding itself."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("basis", torch.eye(embed_dim))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return (F.normalize(embedding, dim=-1) - self.mean.to(embedding.dtype)) @ self.basis.to(embedding.dtype)

    @torch.no_grad()
    def fit(self, embeddings: dict[str, np.ndarray], threshold: float) -> np.ndarray:
        """Set mean and basis from paired N×D unit embeddings, one array per modality (`agreed_directions`);
        returns every direction's correlation (the kept ones are those before the first below `threshold`)."""
        mean, basis, correlations = agreed_directions(embeddings, threshold)
        self.mean.copy_(torch.from_numpy(mean))
        self.basis.zero_()[:, :basis.shape[1]] = torch.from_numpy(basis)
        return correlations

    def reset(self):
        """Back to the identity, so the model's embeddings are again those training made."""
        self.mean.zero_()
        self.basis.copy_(torch.eye(len(self.basis)))

    @property
    def kept(self) -> int:
        """How many directions the embedding keeps (all of them until it is fit)."""
        return int((self.basis.abs().sum(0) > 0).sum())


def agreed_directions(embeddings: dict[str, np.ndarray], threshold: float, ridge: float = 1e-3):
    """(mean, D×j basis, every direction's correlation) of paired N×D unit embeddings, one array per modality: the
    generalised eigenvectors of cov(mean over modalities) against cov(differences, averaged over pairs), best first,
    scaled so each has unit disagreement, cut before the first one whose coordinates correlate between the modalities
    (averaged over pairs) below `threshold`, the best two kept whatever their correlation. `ridge` (a share of the
    mean eigenvalue) keeps the differences' covariance invertible where the embedding never varies."""
    names = list(embeddings)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    mean = np.mean([embeddings[m].mean(0) for m in names], axis=0)
    centred = {m: embeddings[m] - mean for m in names}
    together = np.cov(np.mean([centred[m] for m in names], axis=0).T)
    apart = np.mean([np.cov((centred[a] - centred[b]).T) for a, b in pairs], axis=0)
    apart += ridge * np.trace(apart) / len(apart) * np.eye(len(apart))
    # the generalised problem as an ordinary one: with apart = L Lᵀ, the eigenvectors u of L⁻¹ together L⁻ᵀ give
    # directions v = L⁻ᵀ u, each with vᵀ apart v = 1
    inverse = np.linalg.inv(np.linalg.cholesky(apart))
    ratios, rotations = np.linalg.eigh(inverse @ together @ inverse.T)
    vectors = (inverse.T @ rotations)[:, np.argsort(-ratios)]
    correlations = np.mean([column_correlations(centred[a] @ vectors, centred[b] @ vectors) for a, b in pairs], axis=0)
    below = np.flatnonzero(correlations < threshold)
    # at least the best two: retrieval compares directions, and one number has only its sign (a model trained for a
    # few steps agrees nowhere at 0.95)
    kept = max(min(2, len(correlations)), int(below[0])) if len(below) else len(correlations)
    return mean, vectors[:, :kept], correlations


def column_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The correlation of each column of x with the same column of y (N×D each)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return (x * y).sum(0) / np.sqrt((x ** 2).sum(0) * (y ** 2).sum(0))
