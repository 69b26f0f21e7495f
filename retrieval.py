"""Retrieval between modalities: recall at 1 and 5 of the exact pair or of an item with the same factors
(`retrieval_metrics`, `recall_at`, `factor_match`), the chance level a random ranking reaches (`chance_recall`),
TVL's own touch–vision top-1 (`tvl_top1`), and which values of each shared factor the top-1 mixes up, for every k
(`retrieval_confusion`, written as confusion.csv; `confusion_matrix`, `top1_differs` read it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from prefixes import Encoded
from synthtouch import SynthTouch

RANKS = (1, 5)


def shared_discrete_factors() -> list[str]:
    """SynthTouch's discrete factors that both camera and gel see: factor-level retrieval compares these."""
    return [name for name in SynthTouch.FACTORS if SynthTouch.factor_groups[name] == "shared"]


def cosine(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T


def top_items(similarity: torch.Tensor, depth: int = max(RANKS)) -> torch.Tensor:
    """For each query (row), its `depth` most similar gallery items, best first. Recall and `nearest` both rank
    with this call at the same depth (topk breaks ties differently at another depth), so where items tie (rounded
    FSQ codes can), both see the same top-1."""
    return similarity.topk(min(depth, similarity.shape[1]), dim=1).indices


def recall_at(similarity: torch.Tensor, relevant: torch.Tensor, ranks=RANKS) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant gallery item (column) among their top-r most similar."""
    hits = relevant.gather(1, top_items(similarity, max(ranks)))
    return {r: hits[:, :r].any(1).float().mean().item() for r in ranks}


def factor_match(factors: dict[str, np.ndarray], names: list[str]) -> torch.Tensor:
    """N×N bool: items i and j agree on every factor in `names`."""
    codes = torch.as_tensor(np.stack([np.asarray(factors[name]) for name in names], 1))
    return (codes[:, None, :] == codes[None, :, :]).all(-1)


def chance_recall(relevant: torch.Tensor, ranks=RANKS) -> dict[int, float]:
    """Expected recall@r of a random ranking: 1 − C(N−m, r)/C(N, r) for a query with m relevant items."""
    n = relevant.shape[1]
    m = relevant.sum(1).double()
    out = {}
    for r in ranks:
        miss = torch.ones_like(m)
        for j in range(min(r, n)):
            miss = miss * ((n - m - j) / (n - j)).clamp(min=0)
        out[r] = (1 - miss).mean().item()
    return out


def retrieval_metrics(queries: torch.Tensor, gallery: torch.Tensor, relevant: dict[str, torch.Tensor],
                      prefix: str, suffix: str = "") -> dict[str, float]:
    """R@1/R@5 for every relevance level ("pair", "factor"); columns like 'vision->touch R@1 pair'."""
    similarity = cosine(queries, gallery)
    out = {}
    for level, rel in relevant.items():
        for r, value in recall_at(similarity, rel).items():
            out[f"{prefix} R@{r} {level}{suffix}"] = value
    return out


TVL_TOP1 = "touch<->vision TVL top-1"  # the eval.json column of tvl_top1


def tvl_top1(touch: torch.Tensor, vision: torch.Tensor) -> float:
    """TVL's touch–vision accuracy (Fu et al. 2024) as its code computes it, so a number set beside TVL's is the same
    quantity: tvl_enc/loss.py's TVLLoss.get_acc_from_affinity for a pair without text, on the whole test set as one
    batch (tools/visualize_affinity.py --evaluate_all). The affinity of the L2-normalised embeddings, a touch item a
    row and a vision item a column; each row's top-1 (timm's accuracy, by topk) is a hit when it is the row's own
    pair (touch→vision), each column's likewise (vision→touch); the two accuracies averaged. A fraction where TVL
    prints percent; chance is 1/N. It is the mean of the two directions' exact-pair R@1 but for ties, and is
    computed on its own so that what is reported as TVL's number follows TVL's definition rather than ours."""
    affinity = cosine(touch, vision)
    pairs = torch.arange(len(affinity))
    touch_to_vision = (affinity.topk(1, dim=1).indices[:, 0] == pairs).float().mean()
    vision_to_touch = (affinity.T.topk(1, dim=1).indices[:, 0] == pairs).float().mean()
    return ((touch_to_vision + vision_to_touch) / 2).item()


def nearest(queries: torch.Tensor, gallery: torch.Tensor, ranks=RANKS) -> torch.Tensor:
    """For each query, the index of its most similar gallery item (cosine): the top-1 that `recall_at` with the
    same `ranks` judges."""
    return top_items(cosine(queries, gallery), max(ranks))[:, 0]


def top1_confusion(factors: dict[str, np.ndarray], name: str, top1: torch.Tensor) -> pd.DataFrame:
    """Counts of (the query's value, its top-1 item's value) of a SynthTouch factor: which values retrieval mixes up."""
    values = SynthTouch.FACTORS[name]
    codes = np.asarray(factors[name])
    counts = np.zeros((len(values), len(values)), dtype=int)
    np.add.at(counts, (codes, codes[top1.numpy()]), 1)
    return pd.DataFrame(counts, index=pd.Index(values, name="query"), columns=pd.Index(values, name="retrieved"))


def retrieval_confusion(encoded: dict[str, Encoded], factors: dict[str, np.ndarray], ks: list[int],
                        names: list[str] | None = None) -> pd.DataFrame:
    """Where factor-level retrieval fails: for every k, direction a->b and shared discrete factor (`names`), the
    `top1_confusion` counts, one row per (query value, retrieved value) with its count. evaluate_run writes it as
    confusion.csv; `confusion_matrix` and `top1_differs` read it."""
    rows = []
    for k in ks:
        for a in encoded:
            for b in encoded:
                if a == b:
                    continue
                top1 = nearest(encoded[a].embeddings[k], encoded[b].embeddings[k])
                for name in names or shared_discrete_factors():
                    counts = top1_confusion(factors, name, top1).stack()
                    rows += [{"k": k, "direction": f"{a}->{b}", "factor": name, "query": query, "retrieved": retrieved,
                              "count": int(count)} for (query, retrieved), count in counts.items()]
    return pd.DataFrame(rows)


def confusion_matrix(confusion: pd.DataFrame, k: int, factor: str, direction: str = "vision->touch") -> pd.DataFrame:
    """One factor's query-value × retrieved-value counts at prefix length k, values in SynthTouch's order."""
    rows = confusion[(confusion.k == k) & (confusion.direction == direction) & (confusion.factor == factor)]
    if rows.empty:
        raise ValueError(f"no confusion counts for k={k}, {direction}, {factor!r}; the table has k "
                         f"{sorted(confusion.k.unique().tolist())}, directions {sorted(confusion.direction.unique())}, "
                         f"factors {sorted(confusion.factor.unique())}")
    values = SynthTouch.FACTORS[factor]
    unknown = sorted((set(rows["query"]) | set(rows["retrieved"])) - set(values))
    if unknown:
        raise ValueError(f"the confusion counts of {factor!r} name values {unknown} that SynthTouch does not have "
                         f"({values}); the table is of another testbed version: re-evaluate the run with this code")
    counts = rows.pivot(index="query", columns="retrieved", values="count")
    return counts.reindex(index=values, columns=values).fillna(0).astype(int)  # a value never retrieved: 0


def top1_differs(confusion: pd.DataFrame, k: int, direction: str = "vision->touch") -> pd.Series:
    """Per shared factor, the share of queries whose top-1 item has another value of it. A query counts once per
    factor it gets wrong, so the shares add up to at least 1 − R@1 factor, and the largest is at most that."""
    shares = {}
    for factor in confusion.factor.unique():
        counts = confusion_matrix(confusion, k, factor, direction).to_numpy()
        shares[factor] = 1 - np.trace(counts) / counts.sum()
    return pd.Series(shares, name="top-1 differs")
