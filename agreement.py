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
surely the modalities agree on it.

Then each modality's coordinates are replaced by what they predict of the other modalities' (`CrossPrediction`, a
kernel ridge map fit on the same pairs): what one sensor alone knows predicts nothing of the other's, so the
prediction averages it out, where a linear subspace cannot. On the testbed lighting scales how bright the wear looks,
so the directions that carry wear carried a little lighting with them (read at 0.17 from the agreed coordinates,
0.14 from their prediction; notes on issue 36). The tokens and the embedding head stay as training made them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from probes import RidgePath, kernels_of_widths

WIDTHS = (0.5, 1.0, 2.0, 4.0)  # RBF gamma of the cross-prediction, in units of 1 / (median squared distance)


class AgreedSubspace(nn.Module):
    """(unit embedding − mean) @ basis: embed_dim × embed_dim, its columns past the kept directions zero, then, for
    embeddings of every shared token, each modality's `CrossPrediction`. Until it is fit it is the identity (mean 0,
    basis I, no prediction), so training and its validation read the unit embedding itself."""

    def __init__(self, embed_dim: int, modalities: list[str]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("basis", torch.eye(embed_dim))
        self.predictions = nn.ModuleDict({m: CrossPrediction() for m in modalities})

    def forward(self, embedding: torch.Tensor, modality: str, whole: torch.Tensor) -> torch.Tensor:
        """`whole`: B booleans, True where the row's embedding is of every shared token, the prefix the prediction
        is fit on; shorter prefixes keep the agreed coordinates (a prediction fit on whole embeddings, applied to a
        one-token prefix, moved it off what it was fit on: exact-pair R@1 at k = 1 fell from 0.32 to 0.25)."""
        coordinates = (F.normalize(embedding, dim=-1) - self.mean.to(embedding.dtype)) @ self.basis.to(embedding.dtype)
        if not whole.any():
            return coordinates
        return torch.where(whole[:, None], self.predictions[modality](coordinates), coordinates)

    @torch.no_grad()
    def fit(self, embeddings: dict[str, np.ndarray], threshold: float,
            held_out: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Set mean and basis from paired N×D unit embeddings, one array per modality (`agreed_directions`), and each
        modality's prediction of the others' coordinates, its kernel width and ridge strength chosen on the
        `held_out` pairs (None: a fifth of the given pairs, held out of the prediction's fit). Returns every
        direction's correlation (the kept ones are those before the first below `threshold`)."""
        self.reset()
        mean, basis, correlations = agreed_directions(embeddings, threshold)
        self.mean.copy_(torch.from_numpy(mean))
        self.basis.zero_()[:, :basis.shape[1]] = torch.from_numpy(basis)
        if held_out is None:
            n = len(next(iter(embeddings.values())))
            order, cut = np.random.default_rng(0).permutation(n), max(1, n // 5)
            held_out = {m: e[order[:cut]] for m, e in embeddings.items()}
            embeddings = {m: e[order[cut:]] for m, e in embeddings.items()}
        splits = {"fit": embeddings, "select": held_out}
        coordinates = {split: {m: (e - mean) @ basis for m, e in pairs.items()} for split, pairs in splits.items()}
        for m, prediction in self.predictions.items():
            others = [o for o in self.predictions if o != m]
            prediction.fit({split: c[m] for split, c in coordinates.items()},
                           {split: np.mean([c[o] for o in others], axis=0) for split, c in coordinates.items()})
        return correlations

    def reset(self):
        """Back to the identity, so the model's embeddings are again those training made."""
        self.mean.zero_()
        self.basis.copy_(torch.eye(len(self.basis)))
        for prediction in self.predictions.values():
            prediction.reset()

    def make_room(self, tensors: dict[str, torch.Tensor], prefix: str):
        """Size the predictions' buffers as a checkpoint's (`prefix`: this module's name in it) holds them, empty
        where it holds none (saved before predictions were fit: the identity, as it computed)."""
        for m, prediction in self.predictions.items():
            for name, buffer in prediction.named_buffers():
                key = f"{prefix}predictions.{m}.{name}"
                if key not in tensors:
                    tensors[key] = buffer.new_zeros((0,) * buffer.dim())
                setattr(prediction, name, buffer.new_zeros(tensors[key].shape))

    @property
    def kept(self) -> int:
        """How many directions the embedding keeps (all of them until it is fit)."""
        return int((self.basis.abs().sum(0) > 0).sum())


class CrossPrediction(nn.Module):
    """A kernel ridge map from one modality's agreed coordinates to the others' (their mean, on the same pairs): an RBF
    kernel on landmark rows (probes.RBFKernel), written out as K(x, landmarks) @ weights + offset. The coordinates
    past the kept directions stay zero. Without landmarks (not fit) it is the identity."""

    def __init__(self):
        super().__init__()
        for name in ("landmarks", "weights"):
            self.register_buffer(name, torch.zeros(0, 0))
        self.register_buffer("offset", torch.zeros(0))
        self.register_buffer("gamma", torch.zeros(0))

    def forward(self, coordinates: torch.Tensor) -> torch.Tensor:
        if not len(self.landmarks):
            return coordinates
        kept = self.landmarks.shape[1]
        distances = torch.cdist(coordinates[:, :kept], self.landmarks.to(coordinates.dtype)).square()
        predicted = torch.exp(-self.gamma.to(coordinates.dtype) * distances) @ self.weights.to(coordinates.dtype)
        return F.pad(predicted + self.offset.to(coordinates.dtype), (0, coordinates.shape[1] - kept))

    @torch.no_grad()
    def fit(self, inputs: dict[str, np.ndarray], targets: dict[str, np.ndarray]):
        """Fit on inputs["fit"] → targets["fit"] (N×kept each) for every kernel width of WIDTHS and ridge strength of
        probes.ALPHAS, and keep the map whose predictions of targets["select"] have the least squared error."""
        offset = targets["fit"].mean(0)
        best = (np.inf, None)
        for kernel, centre, features in kernels_of_widths(inputs, WIDTHS):
            path = RidgePath(features["fit"])
            B = path.coefficients(targets["fit"] - offset)
            P = path.project(features["select"])
            for alpha in path.alphas:
                error = ((path.predict(P, B, alpha) + offset - targets["select"]) ** 2).sum(1).mean()
                if error < best[0]:
                    best = (error, (kernel, centre, path.weights(B, alpha)))
        kernel, centre, weights = best[1]
        device = self.offset.device  # the model's: fit at the end of training, wherever it trained
        for name, value in (("landmarks", kernel.landmarks), ("weights", kernel.whiten @ weights),
                            ("offset", offset - centre @ weights), ("gamma", np.array([kernel.gamma]))):
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(value)).float().to(device))

    def reset(self):
        for name, buffer in self.named_buffers():
            setattr(self, name, buffer.new_zeros((0,) * buffer.dim()))


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
