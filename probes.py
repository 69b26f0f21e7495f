"""Probes: how much of a factor a set of features holds, read the same way from any source.

One probe for every source the workbook reads (pixels, frozen encoder tokens, register tokens, shared
embeddings): ridge regression on standardised features, with targets as columns — a continuous factor's
numbers (R², averaged over the columns: the tiles of a detail, the cosine and sine of a phase), a discrete
factor's one-hot code (accuracy of the argmax). `linear` reads the features themselves; `non-linear` reads
an RBF kernel of them (Nyström features on up to `LANDMARKS` rows of the fit split).

Three splits, three jobs: the probe is fit on `fit`, its ridge strength (and, non-linear, its kernel width) is
chosen on `select`, and the chosen probe is scored on `test`. A fixed strength memorises a few hundred rows of
a 2,000-wide input and scores below zero; choosing it on held-out rows is what lets a score of 0 mean
"nothing there" (tests/test_probes.py reads a planted factor and pure noise at the workbook's input widths).

Every strength of the grid costs one matrix product: the fit split's Gram matrix is diagonalised once per
source and kernel width, and all factors of a source share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

PROBES = ("linear", "non-linear")
FIT_ROWS = 2000  # training rows a probe is fit on: the leakage claims need >= 2000 (a probe on fewer reads less)
ALPHAS = 10.0 ** np.arange(-3, 4)  # ridge strengths, in units of the mean squared feature norm
WIDTHS = (0.25, 1.0, 4.0)  # RBF gamma, in units of 1 / (median squared distance between fit rows)
LANDMARKS = 1000  # Nyström rank of the non-linear probe


@dataclass
class Target:
    """What a probe predicts on each split: `y[split]` (codes, or N×C numbers when `continuous`) on the rows
    `rows[split]` (a boolean mask over the split, e.g. the rows whose texture shows a phase)."""
    continuous: bool
    y: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]


def score(continuous: bool, prediction: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> float:
    """R² averaged over target columns, or the accuracy of the argmax over `classes`."""
    if not continuous:
        return float((classes[prediction.argmax(1)] == y).mean())
    y = y.reshape(len(y), -1)
    residual = ((prediction - y) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    return float(np.mean(1 - residual / np.maximum(total, 1e-12)))


def preservation_cosine(prediction: np.ndarray, target: np.ndarray, centre: np.ndarray, mask: np.ndarray) -> float:
    """The preservation loss's measure on N×T×D arrays: the cosine of prediction and target at each real position
    (`mask`, N×T: text is padded), both measured from `centre` (T×D), averaged over a sample's real positions and
    then over samples."""
    p, t = prediction - centre, target - centre
    cos = (p * t).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1), 1e-8)
    return float(((cos * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean())


def chance(target: Target) -> float:
    """What a probe that learned nothing scores: 0 for R² (it predicts the fit split's mean); for accuracy, the
    test rows' share of the fit split's most common class (it always names that class)."""
    if target.continuous:
        return 0.0
    fit, test = np.asarray(target.y["fit"]), np.asarray(target.y["test"])
    return float((test == np.bincount(fit).argmax()).mean())


class RidgePath:
    """Ridge regression from features F (fit rows) for every strength of `ALPHAS` at once: with the Gram matrix
    diagonalised (primal FᵀF or dual FFᵀ, whichever is smaller), the predictions at strength α are
    P diag(1 / (λ + α)) B, where B holds the targets (`coefficients`) and P the rows to predict (`project`) in
    the eigenbasis: one product a strength."""

    def __init__(self, fit: np.ndarray):
        self.fit, self.primal = fit, fit.shape[1] <= fit.shape[0]
        gram = fit.T @ fit if self.primal else fit @ fit.T
        self.eigenvalues, self.vectors = np.linalg.eigh(gram)
        self.eigenvalues = self.eigenvalues.clip(min=0)
        # in the features' dtype: a float64 strength would turn float32 predictions into float64 products
        self.alphas = (ALPHAS * max(np.trace(gram) / len(fit), 1e-12)).astype(gram.dtype)

    def coefficients(self, targets: np.ndarray) -> np.ndarray:
        """B: the centred targets of the fit rows in the eigenbasis."""
        return self.vectors.T @ (self.fit.T @ targets if self.primal else targets)

    def project(self, rows: np.ndarray) -> np.ndarray:
        """P: features of rows to predict, in the eigenbasis."""
        return rows @ self.vectors if self.primal else (rows @ self.fit.T) @ self.vectors

    def predict(self, P: np.ndarray, B: np.ndarray, alpha: float) -> np.ndarray:
        return (P / (self.eigenvalues + alpha)) @ B

    def weights(self, B: np.ndarray, alpha: float) -> np.ndarray:
        """The features × targets map at strength α: what `predict` applies to rows, written out."""
        solved = (self.vectors / (self.eigenvalues + alpha)) @ B
        return solved if self.primal else self.fit.T @ solved

    def leading_directions(self, B: np.ndarray, alpha: float, rank: int) -> np.ndarray:
        """The `rank` leading right singular vectors (as rows) of the fit rows' predictions at strength α: the
        target directions a rank-limited read-out keeps (reduced-rank regression). The predictions are Q·diag(c)·B
        with orthonormal Q (primal: Q = F V Λ^-½, c = √λ / (λ + α); dual: Q = V, c = λ / (λ + α)), so their right
        singular vectors are those of diag(c)·B, read off its Gram matrix, as small as the eigenbasis: nothing as
        wide as the targets is formed but B itself. Directions that carry no prediction are left out."""
        scale = (np.sqrt(self.eigenvalues) if self.primal else self.eigenvalues) / (self.eigenvalues + alpha)
        fitted = scale[:, None].astype(B.dtype) * B
        values, vectors = np.linalg.eigh((fitted @ fitted.T).astype(np.float64))
        leading = np.argsort(values)[::-1][:rank]
        # a float32 Gram matrix holds singular values down to ~1e-3 of the largest: the rest carry ~1e-6 of the
        # predictions' energy, and leaving them out costs the read-out that much
        leading = leading[values[leading] > values.max() * (1e-12 if B.dtype == np.float64 else 1e-6)]
        return (vectors[:, leading].T.astype(B.dtype) @ fitted) / np.sqrt(values[leading]).astype(B.dtype)[:, None]


def standardised(x: dict[str, np.ndarray], dtype=np.float32) -> dict[str, np.ndarray]:
    """Every split scaled by the fit split's mean and standard deviation (constant columns left at 0), in float32
    by default: a probe's products and eigendecompositions take half the time of float64's. An R² moves by a few
    millionths (notebook 01's testbed probes, the workbook's widest inputs: at most 3e-6); an accuracy moves only
    where a test row's two best classes tie within rounding (the demo's evaluation: one row of 1000, in 14 of its
    1776 leakage numbers). The ridge strengths (at least 1e-3 of the mean squared feature norm) keep the solve
    conditioned where float32 rounding would show."""
    mean, std = x["fit"].mean(0, dtype=np.float64), x["fit"].std(0, dtype=np.float64)
    std[std == 0] = 1
    return {split: ((value - mean) / std).astype(dtype) for split, value in x.items()}


class RBFKernel:
    """The RBF kernel on up to `LANDMARKS` rows of a fit split (Nyström): features = K(rows, L) K(L, L)^-1/2, whose
    inner products approximate the kernel. gamma = width / median squared distance between the landmarks. The
    squared distances to the landmarks do not depend on the width: `of_widths` makes the kernels of every width
    from one set of landmarks, and `features` takes the distances (`distances`), so they are computed once
    (`kernels_of_widths`)."""

    def __init__(self, landmarks: np.ndarray, between: np.ndarray, median: float, width: float):
        self.landmarks, self.gamma = landmarks, width / median
        values, vectors = np.linalg.eigh(np.exp(-self.gamma * between))
        keep = values > values.max() * 1e-8
        self.whiten = vectors[:, keep] / np.sqrt(values[keep])

    @classmethod
    def of_widths(cls, fit: np.ndarray, widths) -> list[RBFKernel]:
        """One kernel per width, on the same landmarks (a fixed draw of the fit rows)."""
        landmarks = fit[np.random.default_rng(0).permutation(len(fit))[:LANDMARKS]]
        between = squared_distances(landmarks, landmarks)
        median = max(np.median(between[np.triu_indices(len(landmarks), 1)]), 1e-12)
        return [cls(landmarks, between, median, width) for width in widths]

    def distances(self, rows: np.ndarray) -> np.ndarray:
        return squared_distances(rows, self.landmarks)

    def features(self, distances: np.ndarray) -> np.ndarray:
        """The kernel features of rows given their squared distances to the landmarks (`distances`), in the rows'
        dtype: float32 for a probe (`standardised`), float64 where a model's map is fit on them (agreement.py)."""
        return (np.exp(-self.gamma * distances) @ self.whiten).astype(self.landmarks.dtype)


def squared_distances(rows: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """In float64 whatever the rows' dtype: the kernel's whitening keeps eigenvalues down to 1e-8 of the largest,
    which float32 distances (rounded at 1e-7 of a distance) would turn into noise."""
    rows, landmarks = rows.astype(np.float64), landmarks.astype(np.float64)
    squared = (landmarks ** 2).sum(1)
    return np.maximum((rows ** 2).sum(1)[:, None] + squared[None, :] - 2 * rows @ landmarks.T, 0)


def kernels_of_widths(x: dict[str, np.ndarray], widths) -> Iterator[tuple[RBFKernel, np.ndarray, dict]]:
    """For each width: `RBFKernel` on the fit split, the fit split's mean kernel features, and every split's kernel
    features less that mean. The splits' distances to the landmarks are computed once: every width's kernel has
    the same landmarks."""
    kernels = RBFKernel.of_widths(x["fit"], widths)
    distances = {split: kernels[0].distances(rows) for split, rows in x.items()}
    for kernel in kernels:
        features = {split: kernel.features(d) for split, d in distances.items()}
        mean = features["fit"].mean(0)
        yield kernel, mean, {split: value - mean for split, value in features.items()}


def probe(kind: str, x: dict[str, np.ndarray], targets: dict[str, Target]) -> dict[str, tuple[float, float]]:
    """(test score, chance) of every target, read from features `x` = {"fit", "select", "test": N×D}.

    The strength (and kernel width) with the best score on `select` is the one scored on `test`."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")
    x = standardised({split: np.asarray(value).reshape(len(value), -1) for split, value in x.items()})
    best = {name: (-np.inf, np.nan) for name in targets}  # name -> (select score, test score)
    # targets that are fit on the same rows share one diagonalisation
    groups: dict[bytes, list[str]] = {}
    for name, target in targets.items():
        groups.setdefault(np.asarray(target.rows["fit"]).tobytes(), []).append(name)
    for names in groups.values():
        fit_rows = targets[names[0]].rows["fit"]
        rows_x = {"fit": x["fit"][fit_rows], "select": x["select"], "test": x["test"]}
        for features in ([rows_x] if kind == "linear" else (f for *_, f in kernels_of_widths(rows_x, WIDTHS))):
            if kind == "linear":
                mean = features["fit"].mean(0)
                features = {split: value - mean for split, value in features.items()}
            path = RidgePath(features["fit"])
            columns, classes = [], {}
            for name in names:
                target = targets[name]
                y = np.asarray(target.y["fit"])
                if target.continuous:
                    columns.append(y.reshape(len(y), -1).astype(np.float32))
                else:
                    classes[name] = np.unique(y)
                    columns.append((y[:, None] == classes[name][None, :]).astype(np.float32))
            Y = np.concatenate(columns, 1)
            offset = Y.mean(0)
            B = path.coefficients(Y - offset)
            P = {split: path.project(features[split]) for split in ("select", "test")}
            at = {split: [path.predict(P[split], B, alpha) for alpha in path.alphas] for split in ("select", "test")}
            start = 0
            for name, block in zip(names, columns):
                target, cut = targets[name], slice(start, start + block.shape[1])
                start += block.shape[1]
                for select, test in zip(at["select"], at["test"]):
                    scores = [score(target.continuous, (pred[:, cut] + offset[cut])[target.rows[split]],
                                    np.asarray(target.y[split]), classes.get(name))
                              for split, pred in (("select", select), ("test", test))]
                    if scores[0] > best[name][0]:
                        best[name] = tuple(scores)
    return {name: (best[name][1], chance(targets[name])) for name in targets}
