"""The preservation decoder's linear read-out, solved in closed form at the end of training.

Trained by gradient steps alongside everything else, a rank-64 read-out of fixed tokens reached a cosine 0.07 below
what a ridge regression reads from the same tokens, in as many steps as phase 1 takes, and no step size, input
scaling or whitening closed that. A read-out is linear, so its best weights have a closed form: for each prefix
length k of the grid, a ridge regression from the first k tokens to what the decoder's attention part leaves of the
frozen features, its strength chosen on the validation split by the preservation cosine, cut to the read-out's
rank (reduced-rank regression: the fitted values' leading directions). The tokens stay as training made them."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import prefixes
import probes
from features import Features


def attended_rows(decoder, tokens: torch.Tensor, k: int, batch_size: int = 256) -> np.ndarray:
    """N×T·D: the attention part of the reconstruction with the first k tokens kept, float32 (the solve on 4000
    rows takes half the time of float64, and the ridge strength keeps it well conditioned)."""
    keep = (torch.arange(tokens.shape[1], device=tokens.device) < k).expand(len(tokens), -1)
    attended = torch.cat([decoder.attended(tokens[i:i + batch_size], keep[i:i + batch_size])
                          for i in range(0, len(tokens), batch_size)])
    return attended.flatten(1).float().cpu().numpy()


SLICED_PRODUCTS = True  # bench/bench_solve.py switches it off for its baseline (the products made at each k)


class TokenRows:
    """Every split's register tokens as standardised rows (N×R·hidden, float32): the first k tokens of a prefix are
    the first k·hidden columns, standardised alike at every k, so the fit rows' products with the centred targets
    (Fᵀ·Y, the largest part of a solve) are computed once, at all tokens, and every k takes its first rows."""

    def __init__(self, tokens: dict[str, torch.Tensor], targets: np.ndarray):
        x = {split: t.flatten(1).float().cpu().numpy() for split, t in tokens.items()}
        self.hidden = tokens["fit"].shape[-1]
        self.mean, self.std = x["fit"].mean(0), x["fit"].std(0)
        self.std[self.std == 0] = 1
        self.z = {split: (value - self.mean) / self.std for split, value in x.items()}
        fit = self.z["fit"]
        # Fᵀ1 (about 0: the columns are centred, up to rounding) and Ȳ, the same at every k
        self.sums, self.target_mean = fit.sum(0), targets.mean(0)
        # only where a prefix's rows are solved in the primal form (no wider than they are many: probes.RidgePath);
        # Fᵀ(Y - Ȳ) as FᵀY - (Fᵀ1)Ȳᵀ, without a centred copy of the targets
        primal = fit.shape[1] <= fit.shape[0]
        self.products = fit.T @ targets - np.outer(self.sums, self.target_mean) if primal and SLICED_PRODUCTS else None

    def prefix(self, k: int) -> dict[str, np.ndarray]:
        return {split: value[:, :k * self.hidden] for split, value in self.z.items()}


@torch.no_grad()
def solve_readouts(model, train: dict[str, Features], val: dict[str, Features], tokens: dict | None = None):
    """Set every per-k read-out map of the model's preservation decoders (`FeatureDecoder.readout_ks`, made here)
    to its ridge solution on `train`, strength chosen on `val`, and its weight on the attention part to 1 or 0,
    whichever reads `val` better. From then on the decoders read through them, not through the trained map.
    `tokens`: {"fit": {modality: register outputs of `train`}, "select": (of `val`)} when already encoded.

    On the CPU with several threads, each modality solves in a thread of its own on one core: its products, its
    eigendecompositions and its decoder passes are too small to split well over threads (on two cores, 1.3x for
    twice the cores), and the modalities do not depend on each other."""
    was_training = model.training
    model.eval()

    @torch.no_grad()  # grad mode is per thread: the decorator above does not reach the pool's threads
    def solve(m):
        decoder, splits = model.decoders[m], {"fit": train[m], "select": val[m]}
        device = next(decoder.parameters()).device  # the attention part runs there, the solve on the CPU
        registers = {split: (tokens[split][m] if tokens is not None else
                             prefixes.encode(model, m, f, [], reconstruct=False).tokens).to(device)
                     for split, f in splits.items()}
        targets = {split: np.asarray(f.tokens, dtype=np.float32).reshape(len(f.pooled), -1)
                   for split, f in splits.items()}
        masks = {split: np.asarray(f.mask, dtype=np.float32) for split, f in splits.items()}
        centre = model.feature_means.of(m).float().cpu().numpy()
        rows = TokenRows(registers, targets["fit"])
        decoder.make_solved_maps()
        for g, k in enumerate(tqdm(decoder.readout_ks.tolist(), desc=f"solving the {m} read-out for each k",
                                   leave=False)):
            decoder.attention_weight[g] = solve_one(decoder, g, k, registers, rows, targets, masks, centre)

    modalities, threads = list(model.decoders), torch.get_num_threads()
    side_by_side = min(len(modalities), threads) > 1 and next(model.parameters()).device.type == "cpu"
    try:
        if not side_by_side:
            for m in modalities:
                solve(m)
            return
        torch.set_num_threads(1)
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(min(len(modalities), threads)) as pool:
            list(pool.map(solve, modalities))  # list: a solve's error is raised here
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def solve_one(decoder, g: int, k: int, tokens, rows: TokenRows, targets, masks, centre) -> float:
    """Set map `g` (Linear(R·hidden, rank), Linear(rank, T·D)) to the rank-limited ridge read-out of the first k
    tokens, of the frozen features less the attention part or of the features alone (the attention part's
    weight 1 or 0); the weight with the better preservation cosine on 'select' is returned. Trained beside the
    read-out by gradient steps, the attention part can output far more than the features (touch: 18x their
    spread) for the read-out to cancel on the cosine; a least-squares read-out cancels it only where it is linear."""
    attended = {split: attended_rows(decoder, tokens[split], k) for split in tokens}
    width = k * rows.hidden
    z, mean, std = rows.prefix(k), rows.mean[:width], rows.std[:width]
    path = probes.RidgePath(z["fit"])
    select, shape = path.project(z["select"]), (len(z["select"]), -1, centre.shape[-1])
    best, attended_mean = None, attended["fit"].mean(0)
    for weight in (1.0, 0.0):
        offset = rows.target_mean - weight * attended_mean  # the mean of the fit rows' residual
        if path.primal and rows.products is not None:
            # Fᵀ(residual - offset) = Fᵀ(Y - Ȳ) - weight·Fᵀ(A - Ā), with Fᵀ(A - Ā) = FᵀA - (Fᵀ1)Āᵀ: no N×T·D array is
            # made (each took up to a second to allocate, most of a solve's time outside its products)
            products = rows.products[:width]
            if weight:
                products = products - (z["fit"].T @ attended["fit"] - np.outer(rows.sums[:width], attended_mean))
            B = path.vectors.T @ products
        else:
            B = path.coefficients(targets["fit"] - weight * attended["fit"] - offset)
        for alpha in path.alphas:
            prediction = weight * attended["select"] + offset + path.predict(select, B, alpha)
            score = probes.preservation_cosine(prediction.reshape(shape), targets["select"].reshape(shape), centre,
                                               masks["select"])
            if best is None or score > best[0]:
                best = (score, weight, offset, B, alpha)
    _, weight, offset, B, alpha = best
    linear_map = decoder.solved[g]
    directions = path.leading_directions(B, alpha, linear_map[0].out_features)  # ≤ rank × T·D, orthonormal rows
    # the k·hidden × T·D map itself is never written out (at TVL's touch tokens, 196×768 numbers, it is 2.5 GB):
    # the map onto the directions is the ridge map of the targets' coordinates along them
    inward = path.weights(B @ directions.T, alpha) / std[:, None]  # raw tokens → the directions
    first = np.zeros((linear_map[0].out_features, linear_map[0].in_features))
    first[:len(directions), :inward.shape[0]] = inward.T  # tokens after the first k read as zeros anyway
    second = np.zeros((linear_map[1].out_features, linear_map[0].out_features))
    second[:, :len(directions)] = directions.T
    linear_map[0].weight.copy_(torch.from_numpy(first))
    linear_map[0].bias.zero_()
    linear_map[1].weight.copy_(torch.from_numpy(second))
    # the intercept, less what the standardisation's shift does through the rank-limited map
    linear_map[1].bias.copy_(torch.from_numpy(offset - (mean @ inward) @ directions))
    return weight
