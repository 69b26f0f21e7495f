"""Caption metrics, all offline: BLEU-4 and CIDEr-D as the COCO caption toolkit (pycocoevalcap) computes them,
exact captions, per-adjective precision / recall / F1 (adjective-list captions: TVL), and attribute accuracy
with its baselines (SynthTouch, whose captions name its factors). Functions of strings; no model."""
from __future__ import annotations

import contextlib
import functools
import io
import re
from collections import Counter

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from synthtouch import SynthTouch

# per-adjective precision / recall / F1 (adjective-list captions: TVL), attribute accuracy (SynthTouch)

# what COCO's PTBTokenizer drops after tokenizing (pycocoevalcap/tokenizer/ptbtokenizer.py); brackets come
# out of PTB as -LRB- etc., which it drops too
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
               "(", ")", "[", "]", "{", "}", '"'}
# PTB tokens: clitics split off ("it's" -> it 's, "don't" -> do n't), hyphenated words whole, other marks alone
PTB_TOKEN = re.compile(r"n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:-[a-z0-9]+)*?(?=n't\b)|[a-z0-9]+(?:-[a-z0-9]+)*|\S")


@functools.lru_cache(maxsize=1 << 16)  # the same references are tokenized for every metric and every token source
def tokenize(text: str) -> str:
    """What COCO's PTBTokenizer gives for plain English captions, without its Java: lower-case PTB tokens
    with punctuation dropped, joined by single spaces."""
    return " ".join(t for t in PTB_TOKEN.findall(text.lower()) if t not in PUNCTUATION)


def _coco_inputs(candidates: list[str], references) -> tuple[dict, dict]:
    """pycocoevalcap's {id: [tokenized reference, ...]} and {id: [tokenized candidate]}."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(candidates):
        raise ValueError(f"{len(candidates)} captions but {len(refs)} reference sets; they must pair up")
    return ({i: [tokenize(r) for r in rs] for i, rs in enumerate(refs)},
            {i: [tokenize(c)] for i, c in enumerate(candidates)})


def bleu4(candidates: list[str], references) -> float:
    """Corpus BLEU-4 as the COCO caption toolkit computes it (closest reference length for the brevity
    penalty). `references`: one str or a list of str per candidate."""
    with contextlib.redirect_stdout(io.StringIO()):  # the scorer prints its n-gram counts
        scores, _ = Bleu(4).compute_score(*_coco_inputs(candidates, references))
    return float(scores[3])


def cider_d(candidates: list[str], references) -> float:
    """CIDEr-D as the COCO caption toolkit computes it (its `Cider`: TF-IDF n-grams, n = 1..4, document
    frequencies over this corpus's references, clipped candidate counts, Gaussian length penalty, x10)."""
    score, _ = Cider().compute_score(*_coco_inputs(candidates, references))
    return float(score)


def exact_match(candidates: list[str], references) -> float:
    """Caption accuracy: how often a caption equals its reference (one of them), after tokenizing."""
    gts, res = _coco_inputs(candidates, references)
    return float(np.mean([res[i][0] in gts[i] for i in res]))


def adjectives(caption: str) -> set[str]:
    """The adjectives of a list caption ("soft, smooth and shiny"): comma / "and" separated, tokenized."""
    items = re.split(r",|\band\b", caption.lower())
    return {tokenize(item) for item in items} - {""}


def is_adjective_list(references: list[str]) -> bool:
    """Captions that are lists of one- or two-word items, at least two on average (TVL, SynthTouch)."""
    items = [adjectives(r) for r in references]
    return (all(len(a.split()) <= 2 for its in items for a in its)
            and float(np.mean([len(its) for its in items])) >= 2)


def adjective_scores(candidates: list[str], references: list[str]) -> dict:
    """Per adjective of the references: precision (of the captions naming it, how many should), recall (of
    the references with it, how many captions name it) and F1; and their means over adjectives (macro)."""
    said, true = [adjectives(c) for c in candidates], [adjectives(r) for r in references]
    per = {}
    for word in sorted(set().union(*true)):
        hits = sum(word in s and word in t for s, t in zip(said, true))
        named, present = sum(word in s for s in said), sum(word in t for t in true)
        precision, recall = hits / named if named else 0.0, hits / present
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        per[word] = {"precision": precision, "recall": recall, "f1": f1}
    macro = {f"adjective {k}": float(np.mean([v[k] for v in per.values()])) for k in ("precision", "recall", "f1")}
    return {**macro, "per adjective": per}


def factor_groups() -> dict[str, str]:
    """Discrete SynthTouch factor → group (shared / vision / touch): who can know a caption attribute."""
    return {name: SynthTouch.factor_groups[name] for name in SynthTouch.FACTORS}


def summarize_accuracy(per_factor: dict[str, float]) -> dict[str, float]:
    """Per-factor accuracies → overall mean, mean per group, and the per-factor values."""
    groups = factor_groups()
    out = {"accuracy": float(np.mean(list(per_factor.values())))}
    for group in dict.fromkeys(groups.values()):
        out[f"accuracy {group}"] = float(np.mean([v for k, v in per_factor.items() if groups[k] == group]))
    out.update({f"accuracy {k}": v for k, v in per_factor.items()})
    return out


def attribute_accuracy(captions: list[str], factors: list[dict]) -> dict[str, float]:
    """How often a caption names each factor's true value (a missing attribute counts as wrong)."""
    parsed = [SynthTouch.parse_caption(c) for c in captions]
    return summarize_accuracy({name: float(np.mean([p[name] == f[name] for p, f in zip(parsed, factors)]))
                               for name in factor_groups()})


def attribute_baselines(train_factors: list[dict], test_factors: list[dict]) -> dict[str, dict[str, float]]:
    """What a caption without information scores: `majority` always names the train split's most common
    value (what a decoder that ignores its input converges to); `chance` picks uniformly."""
    majority, chance = {}, {}
    for name in factor_groups():
        top = Counter(f[name] for f in train_factors).most_common(1)[0][0]
        majority[name] = float(np.mean([f[name] == top for f in test_factors]))
        chance[name] = 1 / len(SynthTouch.FACTORS[name])
    return {"majority": summarize_accuracy(majority), "chance": summarize_accuracy(chance)}


def caption_metrics(captions: list[str], references: list[str], factors: list[dict] | None = None) -> dict:
    """BLEU-4, CIDEr-D and caption accuracy (exact match); per-adjective scores for adjective-list captions;
    per-factor attribute accuracy when SynthTouch `factors` are given."""
    out = {"bleu4": bleu4(captions, references), "cider_d": cider_d(captions, references),
           "caption accuracy": exact_match(captions, references)}
    if is_adjective_list(references):
        out.update(adjective_scores(captions, references))
    if factors is not None:
        out.update(attribute_accuracy(captions, factors))
    return out
