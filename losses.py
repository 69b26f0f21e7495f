"""Phase 1's losses, each a plain function of tensors so that a test can check it against a direct computation:
InfoNCE (plain, Matryoshka, across ranks), alignment, preservation, complementary, decorrelation, and the flow head
(`FlowMatcher`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (rank order), differentiable, so contrastive negatives span the global batch."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between L2-normalised rows of a and b (row i of a matches row i of b)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp() * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def alignment_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Confidence-weighted alignment: the squared distance between the L2-normalised rows of a pair, weighted
    by how surely InfoNCE already matches them (the softmax probability of the positive, both directions,
    detached). InfoNCE's pull on a positive pair fades as (1 − p), so once pairs are ranked first nothing
    removes what one modality sees and the other cannot (it can sit in directions the other never uses);
    this pull grows with p, so matched pairs keep coming together until their embeddings agree, the alignment
    condition under which contrastive learning keeps only the shared content (Wang & Isola 2020; Daunhawer
    et al. 2023). The weight is p above chance, (p − 1/B)/(1 − 1/B): off while nothing is matched yet, where a
    plain alignment term collapses every embedding to one point (measured: within one epoch at weight 4)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    with torch.no_grad():
        logits = logit_scale.exp() * a @ b.T
        p = (logits.softmax(1).diagonal() + logits.softmax(0).diagonal()) / 2
        chance = 1 / len(a)
        confidence = (p - chance).clamp(min=0) / (1 - chance)  # 0 up to chance: collapsed rows are not pulled
    return (confidence * (a - b).pow(2).sum(-1)).mean()


def matryoshka_info_nce(a, b, logit_scale, dims: tuple[int, ...]) -> torch.Tensor:
    """Matryoshka (MRL): InfoNCE on the leading `dims` of the embedding, averaged."""
    return torch.stack([info_nce(a[:, :d], b[:, :d], logit_scale) for d in dims]).mean()


def preservation_loss(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      centre: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine similarity between reconstructed and frozen token features, over real tokens. With `centre`
    (T×D, the mean feature of each position), both are measured from it: most of a frozen feature's length is what every
    sample shares (position, the encoder's biases), which a raw cosine rewards for free, while what the
    tokens are there to keep is what varies between samples."""
    if centre is not None:
        reconstruction, target = reconstruction - centre, target - centre
    cos = F.cosine_similarity(reconstruction, target, dim=-1)
    mask = mask.to(cos.dtype)
    return 1 - (cos * mask).sum() / mask.sum()


def complementary_regularizer(complementary: torch.Tensor, overlap: torch.Tensor,
                              keep: torch.Tensor | None = None) -> torch.Tensor:
    """FluxTalk's regulariser on the complementary tokens (B×C×D): an L2 penalty on their size plus a
    diversity term, the squared cosine between each complementary token and the overlap mean (B×D),
    so complementary tokens carry something the overlapping ones do not. Averaged over the kept tokens
    only (`keep`: B×C), so the weight means the same whatever nested dropout drew."""
    keep = torch.ones(complementary.shape[:2], device=complementary.device) if keep is None else keep
    keep = keep.to(complementary.dtype)
    if keep.sum() == 0:
        return complementary.sum() * 0  # every complementary token dropped: nothing to regularise
    l2 = complementary.pow(2).mean(-1)  # per dimension, so the weight does not depend on the width
    diversity = F.cosine_similarity(complementary, overlap[:, None, :], dim=-1).pow(2)
    return ((l2 + diversity) * keep).sum() / keep.sum()


def decorrelation_penalty(tokens: torch.Tensor, keep: torch.Tensor, n_shared: int) -> torch.Tensor:
    """Mean squared cross-correlation (over the batch) between the mean kept shared token and the mean kept
    private token, B×R×D tokens: 0 when no linear function of one predicts the other. Rows that kept no
    private token do not count (after Barlow Twins' and VICReg's correlation penalties, across groups)."""
    keep = keep.to(tokens.dtype)[..., None]
    rows = keep[:, n_shared:].sum((1, 2)) > 0
    if rows.sum() < 2:
        return tokens.sum() * 0  # nothing private in this batch to decorrelate from
    shared = (tokens[rows, :n_shared] * keep[rows, :n_shared]).sum(1) / keep[rows, :n_shared].sum(1)
    private = (tokens[rows, n_shared:] * keep[rows, n_shared:]).sum(1) / keep[rows, n_shared:].sum(1)
    standard = [(x - x.mean(0)) / (x.std(0) + 1e-5) for x in (shared, private)]
    return (standard[0].T @ standard[1] / len(shared)).pow(2).mean()


class FlowMatcher(nn.Module):
    """Rectified flow between modalities' shared embeddings (after CrossFlow): a velocity field
    v(x_t, t | A→B) trained on straight paths x_t = (1−t)·x_A + t·x_B, one direction per ordered pair."""

    def __init__(self, dim: int, pairs: list[tuple[str, str]], hidden: int = 512):
        super().__init__()
        self.pairs = [f"{a}->{b}" for a, b in pairs]
        self.direction = nn.Embedding(len(self.pairs), dim)
        self.net = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def velocity(self, x, t, pair: str):
        d = self.direction.weight[self.pairs.index(pair)].expand(len(x), -1)
        return self.net(torch.cat([x, d, t[:, None]], dim=-1))

    def loss(self, x_a, x_b, pair: str) -> torch.Tensor:
        t = torch.rand(len(x_a), device=x_a.device)
        x_t = (1 - t[:, None]) * x_a + t[:, None] * x_b
        return F.mse_loss(self.velocity(x_t, t, pair), x_b - x_a)

    @torch.no_grad()
    def transport(self, x_a, pair: str, steps: int = 10) -> torch.Tensor:
        """Euler-integrate A's (L2-normalised) embedding to B's space."""
        x = F.normalize(x_a, dim=-1)
        for i in range(steps):
            t = torch.full((len(x),), i / steps, device=x.device)
            x = x + self.velocity(x, t, pair) / steps
        return x
