"""The probe every measure of the workbook reads through (probes.py), at the input widths a run gives it: a
factor planted in the features is read, pure noise reads as nothing (a score near 0, never a large negative
one), and a factor hidden from a linear read-out is read by the non-linear probe only."""
import functools

import numpy as np
import pytest

import probes

SPLITS = dict(fit=probes.FIT_ROWS, select=500, test=1000)  # the rows evaluate_run gives a probe


def everywhere(n):
    return {split: np.ones(rows, dtype=bool) for split, rows in n.items()}


def planted(width: int, seed: int = 0):
    """Features of `width` standard normal numbers; a continuous factor of 8 tiles (like a detail) is added, each
    tile along a direction of its own (a linear read-out could reach R² = 0.75); class 2 of a 4-class factor moves the features along one direction;
    an xor factor is the sign product of two coordinates, which no linear read-out sees."""
    rng = np.random.default_rng(seed)
    spread = rng.normal(size=(8, width)) / np.sqrt(width) * 6
    direction = rng.normal(size=width) / np.sqrt(width) * 3
    x, targets = {}, {}
    tile, classes, xor, noise, noise_class = {}, {}, {}, {}, {}
    for split, n in SPLITS.items():
        tile[split] = rng.uniform(size=(n, 8))
        classes[split] = rng.integers(4, size=n)
        noise[split], noise_class[split] = rng.normal(size=n), rng.integers(3, size=n)
        features = rng.normal(size=(n, width))
        features += (tile[split] - 0.5) @ spread + np.outer(classes[split] == 2, direction)
        features[:, :2] = rng.normal(size=(n, 2))  # the xor's two numbers carry nothing else
        xor[split] = (features[:, 0] * features[:, 1] > 0).astype(int)
        x[split] = features
    rows = everywhere(SPLITS)
    targets = dict(tiles=probes.Target(True, tile, rows), classes=probes.Target(False, classes, rows),
                   xor=probes.Target(False, xor, rows), noise=probes.Target(True, noise, rows),
                   noise_classes=probes.Target(False, noise_class, rows))
    return x, targets


# one register token, the shared group (4 tokens), the private group (12 tokens): the widths of the information map
@pytest.mark.parametrize("width", [128, 512, 1536])
def test_a_probe_reads_a_planted_factor_and_nothing_from_noise(width):
    x, targets = planted(width)
    for kind in probes.PROBES:
        scores = probes.probe(kind, x, targets)
        assert scores["tiles"][0] > 0.5, (kind, width, scores)
        assert scores["classes"][0] > scores["classes"][1] + 0.1, (kind, width, scores)
        # noise: the chosen regularisation shrinks the probe to the mean, so R² sits within a few 1/n of 0. With a
        # fixed strength (the workbook's old Ridge(alpha=10)) a 1536-wide input on 500 rows scored -0.67
        assert -0.03 < scores["noise"][0] < 0.03, (kind, width, scores)
        # accuracy of a probe that knows nothing: the majority rate, within 3 standard errors of 1000 test rows
        majority = scores["noise_classes"][1]
        assert abs(scores["noise_classes"][0] - majority) < 3 * np.sqrt(majority * (1 - majority) / 1000) + 0.02


@pytest.mark.parametrize("kind", probes.PROBES)
def test_float32_probes_score_as_float64_ones(kind, monkeypatch):
    """Probes compute in float32 (probes.standardised) for half the time; at the widest input of the information
    map their scores are float64's to rounding. Tolerances: R² is a ratio of sums over 1000 test rows whose float32
    rounding is ~1e-6 of each; an accuracy changes in steps of 1/1000, and a test row whose two best classes are
    within float32 rounding of each other may flip: two such rows at most. A float32 solve that lost its
    conditioning (a strength below the features' rounding) would miss by far more."""
    x, targets = planted(1536)
    single = probes.probe(kind, x, targets)
    monkeypatch.setattr(probes, "standardised", functools.partial(probes.standardised, dtype=np.float64))
    double = probes.probe(kind, x, targets)
    for name, target in targets.items():
        tolerance = 1e-4 if target.continuous else 2 / SPLITS["test"]
        assert abs(single[name][0] - double[name][0]) <= tolerance, (kind, name, single[name], double[name])


def test_kernel_features_keep_the_rows_dtype():
    """A probe's kernel features are float32 like its linear ones; agreement.py fits a map of the model on float64
    embeddings, and gets float64 features, as before probes went float32."""
    rows = np.random.default_rng(0).normal(size=(60, 5))
    for dtype in (np.float32, np.float64):
        x = {split: rows.astype(dtype) for split in ("fit", "select")}
        for _, _, features in probes.kernels_of_widths(x, probes.WIDTHS):
            assert all(value.dtype == dtype for value in features.values())


def test_only_the_non_linear_probe_reads_a_factor_hidden_from_linear_read_outs():
    """An RBF kernel is isotropic: it finds a sign product of two numbers among the 16 of two small tokens (the
    leakage test's planted model), not among 128 noise numbers, where an MLP would need to learn the pair"""
    x, targets = planted(16)
    linear, non_linear = probes.probe("linear", x, targets)["xor"], probes.probe("non-linear", x, targets)["xor"]
    assert linear[0] < 0.56  # chance is 0.5; 3 standard errors of 1000 rows is 0.047
    assert non_linear[0] > 0.65


def test_targets_are_scored_on_their_own_rows_only():
    """A phase is probed only on rows whose texture shows it: rows outside the mask neither fit nor count."""
    x, targets = planted(128)
    keep = {split: np.arange(n) % 2 == 0 for split, n in SPLITS.items()}
    masked = probes.Target(True, {s: targets["tiles"].y[s][keep[s]] for s in SPLITS}, keep)
    whole, half = probes.probe("linear", x, dict(tiles=targets["tiles"], half=masked)).values()
    assert abs(whole[0] - half[0]) < 0.1 and half[0] > 0.5


def test_an_unknown_probe_is_refused():
    with pytest.raises(ValueError, match="unknown probe 'mlp'; choose one of"):
        probes.probe("mlp", *planted(8))


@pytest.mark.parametrize("rows, features", [(40, 10), (10, 40)])
def test_ridge_weights_are_what_predict_applies(rows, features):
    """In the primal form (more rows than features) and the dual one alike: rows @ weights == predict's rows,
    to float64 rounding of a few products of 40 terms."""
    rng = np.random.default_rng(0)
    fit, new, targets = rng.normal(size=(rows, features)), rng.normal(size=(5, features)), rng.normal(size=(rows, 3))
    path = probes.RidgePath(fit)
    B = path.coefficients(targets)
    for alpha in path.alphas[[0, 3, -1]]:
        np.testing.assert_allclose(new @ path.weights(B, alpha), path.predict(path.project(new), B, alpha), atol=1e-9)


@pytest.mark.parametrize("rows, features", [(60, 20), (20, 60)])
def test_leading_directions_are_those_of_the_fit_rows_predictions(rows, features):
    """leading_directions never forms the predictions; it must span what an SVD of them spans (the reduced-rank
    regression's target directions), primal and dual alike. Compared as projections (signs and the order within a
    degenerate pair are free), to float64 rounding of an eigensolve of a 20×20 Gram matrix (1e-8). The failure
    case: the directions of the targets themselves, ignoring the features, span something else."""
    rng = np.random.default_rng(1)
    fit, targets = rng.normal(size=(rows, features)), rng.normal(size=(rows, 30))
    path = probes.RidgePath(fit)
    B = path.coefficients(targets)
    alpha, rank = path.alphas[4], 5  # strong enough that the shrinkage, not the targets alone, orders the directions
    directions = path.leading_directions(B, alpha, rank)
    expected = np.linalg.svd(fit @ path.weights(B, alpha))[2][:rank]
    np.testing.assert_allclose(directions @ directions.T, np.eye(rank), atol=1e-8)
    np.testing.assert_allclose(directions.T @ directions, expected.T @ expected, atol=1e-8)
    of_targets = np.linalg.svd(targets)[2][:rank]
    assert np.abs(of_targets.T @ of_targets - expected.T @ expected).max() > 0.1


def test_preservation_cosine_reads_only_real_positions():
    """The solve's and the ridge read-out's shared measure averages over a sample's real positions (text is
    padded), as the preservation loss does: a prediction right at every real position scores 1 however wrong it is
    at padding, and counting the padding (a mask of ones: the failure case) scores lower. Exact to float64
    rounding of sums of a few terms (1e-12)."""
    rng = np.random.default_rng(0)
    target, centre = rng.normal(size=(3, 5, 4)), rng.normal(size=(5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=float)
    prediction = np.where(mask[..., None] > 0, target, -target + 2 * centre)  # right where real, opposite where padded
    assert probes.preservation_cosine(prediction, target, centre, mask) == pytest.approx(1.0, abs=1e-12)
    assert probes.preservation_cosine(prediction, target, centre, np.ones_like(mask)) < 0.5
