"""What the testbed holds before any training: for every SynthTouch factor, how much of the frozen encoders'
token features it moves, and how well one probe (probes.py) reads it from the pixels and from those tokens.

A register module can only keep what its frozen encoder passes on, and a reconstruction objective only rewards
what moves the features: a fine factor that moves a few hundredths of them is worth a few hundredths of cosine,
whatever the model. So the testbed is checked here, before a model is trained on it (notebook 01):

    variance_shares   each factor redrawn alone, everything else (the sensor noise too) fixed: the share of the
                      token features' variance that moves with it (Sobol's total-effect index), and 'noise', the
                      sensors' noise redrawn alone
    readability       each factor probed linearly from the pixels and from the frozen tokens

The same redraws, measured further down a trained run (`run_stages`: its shared embedding and its private tokens),
say where the model keeps each factor and how much of a private factor reaches the shared embedding: a probe's
score says whether a factor can be read at all, a variance share how loud it is there (notebook 03).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import information
import phase1
import prefixes
from features import Features
from synthtouch import SynthTouch

IMAGE_MODALITIES = ("vision", "touch")
# what a testbed must pass on for its fine scale to be worth keeping: the fine factors a sensor sees move at least
# FINE_SHARE of its frozen tokens' variance between them, and a linear probe reads each from the frozen tokens at
# READABLE (R², fit on probes.FIT_ROWS training rows)
FINE_SHARE, READABLE = 0.2, 0.5
NOISE = "noise"  # the row of the sensors' noise (the render seed), redrawn with every factor fixed
FROZEN = "frozen tokens"


def factor_names() -> list[str]:
    return list(SynthTouch.factor_groups)


def redrawn(name: str, rng: np.random.Generator):
    """A fresh value of one factor, drawn as SynthTouch draws it."""
    if name in SynthTouch.FACTORS:
        values = SynthTouch.FACTORS[name]
        return values[rng.integers(len(values))]
    if name in SynthTouch.DETAILS:
        return tuple(rng.uniform(0, 1, SynthTouch.DETAILS[name] ** 2))
    low, high = SynthTouch.CONTINUOUS_FACTORS[name]
    return float(rng.uniform(low, high))


def frozen_stage(modality: str, out) -> dict[str, torch.Tensor]:
    """The stage the testbed audit measures: a modality's frozen token features, N×(T·D)."""
    return {FROZEN: out.tokens.flatten(1)}


def run_stages(run_dir):
    """The stages of a trained run for `variance_shares`: its frozen tokens, its shared embedding at k = n_shared
    (L2-normalised: retrieval compares directions) and its private tokens (where it has any: the adapter has
    none), from one pass of its register module."""
    model = phase1.load_aligner(run_dir).model.eval()
    S = model.design.shared_k

    def stages(modality: str, out) -> dict[str, torch.Tensor]:
        encoded = prefixes.encode(model, modality, Features(out.pooled, out.tokens, out.mask), [S], reconstruct=False)
        private = {"private tokens": encoded.tokens[:, S:].flatten(1)} if encoded.tokens.shape[1] > S else {}
        return {**frozen_stage(modality, out),
                "shared embedding": torch.nn.functional.normalize(encoded.embeddings[S], dim=-1), **private}
    return stages


def variance_shares(cfg: phase1.TrainConfig, n: int = 48, redraws: int = 4, seed: int = 0,
                    stages=frozen_stage) -> pd.DataFrame:
    """One row per (modality, stage, factor or NOISE): 'share', the mean over `n` samples of a stage's variance
    across `redraws` renders that differ in that factor alone, over its variance across samples. Shares of
    independent factors sum to about 1; what interacts is counted in each factor it involves. `stages(modality,
    encoder output)` gives {stage: N×F tensor}: the frozen tokens alone (`frozen_stage`), or a run's (`run_stages`)."""
    testbed = SynthTouch(n, seed=seed, image_size=cfg.image_size, split="val")
    encoders = {m: phase1.get_encoder(cfg, m) for m in IMAGE_MODALITIES}
    rng = np.random.default_rng(seed)
    bases = [(testbed.factors_of(i), int(rng.integers(2 ** 31))) for i in range(n)]

    @torch.no_grad()
    def variances(samples: list[dict]) -> dict[tuple[str, str], float]:
        """{(modality, stage): the summed variance of that stage's numbers over these samples}."""
        return {(m, stage): x.double().var(0).sum().item() for m in IMAGE_MODALITIES
                for stage, x in stages(m, encoders[m](torch.stack([s[m] for s in samples]))).items()}

    total = variances([testbed.render(factors, noise) for factors, noise in bases])
    rows = []
    for name in tqdm([*factor_names(), NOISE], desc="one factor redrawn at a time", leave=False):
        moved = dict.fromkeys(total, 0.0)
        for factors, noise in bases:
            renders = [testbed.render(factors, int(rng.integers(2 ** 31))) if name == NOISE else
                       testbed.render({**factors, name: redrawn(name, rng)}, noise) for _ in range(redraws)]
            for key, variance in variances(renders).items():
                moved[key] += variance / n
        rows += [dict(modality=m, stage=stage, factor=name, share=moved[m, stage] / total[m, stage])
                 for m, stage in total]
    return pd.DataFrame(rows)


def readability(cfg: phase1.TrainConfig) -> pd.DataFrame:
    """Every factor probed linearly (probes.probe) from each image modality's pixels and frozen tokens (the cached
    features the register module reads): fit on `probes.FIT_ROWS` training rows, tuned on the validation split,
    scored on the test split. One row per (modality, source, factor): score, chance, 'normalised'."""
    splits = {}
    for split, name in zip(information.PROBE_SPLITS, ("train", "val", "test")):
        dataset, features = phase1.split_data(cfg, name)
        index = information.fit_rows(len(dataset)) if split == "fit" else np.arange(len(dataset))
        splits[split] = (dataset, index, features)
    factors = {split: {key: np.asarray(v)[index] for key, v in dataset.factor_table().items()}
               for split, (dataset, index, _) in splits.items()}

    pixels = {}  # split -> modality -> N×pixels, filled at the first pixel job: each sample rendered once for both

    def source(key: dict) -> dict[str, np.ndarray]:
        if key["source"] == "pixels":
            for split, (dataset, index, _) in splits.items():
                if split not in pixels:
                    samples = [dataset[i] for i in index]
                    pixels[split] = {m: np.stack([s[m].flatten().numpy() for s in samples]) for m in IMAGE_MODALITIES}
            return {split: pixels[split][key["modality"]] for split in splits}
        return {split: features[key["modality"]].batch(index).tokens.flatten(1).numpy()
                for split, (_, index, features) in splits.items()}

    names = [name for name in factor_names() if all(name in f for f in factors.values())]
    jobs = [(dict(modality=m, source=s), "linear", names) for m in IMAGE_MODALITIES for s in ("pixels", "frozen tokens")]
    return information.probe_table(jobs, source, information.probe_targets(names, factors), "testbed audit: probes")


def audit(cfg: phase1.TrainConfig, **kwargs) -> pd.DataFrame:
    """One row per (modality, factor): who sees it, its scale, its variance share, and its probe scores from the
    pixels and the frozen tokens (normalised: 0 chance, 1 perfect)."""
    shares = variance_shares(cfg, **kwargs).drop(columns="stage").set_index(["modality", "factor"]).share
    scores = readability(cfg).pivot_table(index=["modality", "factor"], columns="source", values="normalised")
    table = pd.DataFrame({"variance share": shares}).join(scores).reset_index()
    table["group"] = table.factor.map(SynthTouch.factor_groups).fillna("")
    table["scale"] = table.factor.map(SynthTouch.SCALE).fillna("")
    return table[["modality", "factor", "group", "scale", "variance share", "pixels", "frozen tokens"]]


def seen(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of factors a modality's sensor sees (shared ones and its own)."""
    return table[(table.group == "shared") | (table.group == table.modality)]


def verdict(table: pd.DataFrame) -> pd.DataFrame:
    """Per modality, the checks against the targets: the fine factors' variance share between them, the lowest
    linear score of a fine factor from the frozen tokens, and the phases' share against the fine factors'."""
    rows = {}
    for m, part in seen(table).groupby("modality"):
        fine, phases = part[part.scale == "fine"], part[part.factor.isin(list(SynthTouch.PHASE_PERIODS))]
        rows[m] = {"fine factors' variance share": fine["variance share"].sum(),
                   "lowest fine factor from frozen tokens": fine["frozen tokens"].min(),
                   "phases' variance share": phases["variance share"].sum()}
        rows[m]["meets the targets"] = bool(rows[m]["fine factors' variance share"] >= FINE_SHARE and
                                            rows[m]["lowest fine factor from frozen tokens"] >= READABLE and
                                            rows[m]["phases' variance share"] < rows[m]["fine factors' variance share"])
    return pd.DataFrame(rows).T
