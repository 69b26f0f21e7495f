"""The agreed subspace (agreement.py): it keeps what both modalities see and drops a private factor that sits in
directions of small variance, its cross-prediction drops one that moves the embedding inside the shared directions,
and a trained run keeps both in its checkpoint."""
import numpy as np
import pytest
import torch

import core
import phase1
import prefixes
import probes
from agreement import AgreedSubspace, agreed_directions
from tests.conftest import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=2000, seed=0):
    """Paired 16-number embeddings: 4 shared numbers seen by both through one map, a little independent noise each,
    and a private ±1 factor per modality at a twentieth of the shared spread, each in directions of its own."""
    rng = np.random.default_rng(seed)
    shared, mix = rng.normal(size=(n, 4)), rng.normal(size=(4, 16))
    private = {m: rng.choice([-1.0, 1.0], size=n) for m in ("vision", "touch")}
    where = {m: 0.05 * rng.normal(size=16) for m in private}
    embeddings = {m: shared @ mix + 0.05 * rng.normal(size=(n, 16)) + private[m][:, None] * where[m] for m in private}
    return embeddings, private


def read(x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a least-squares read-out of the ±1 factor y, fit on the first half, scored on the second."""
    half = len(x) // 2
    design = np.c_[x, np.ones(len(x))]
    weights = np.linalg.lstsq(design[:half], y[:half], rcond=None)[0]
    return float((np.sign(design[half:] @ weights) == y[half:]).mean())


def test_agreed_directions_keep_the_shared_numbers_and_drop_a_quiet_private_factor():
    embeddings, private = planted()
    mean, basis, correlations = agreed_directions(embeddings, threshold=0.95)
    # the 4 shared directions agree at ~1 / (1 + noise / spread) ≈ 0.99; past them only noise and the private
    # factors vary, which the other modality does not see: correlation ~0 (within 3 / sqrt(2000) ≈ 0.07)
    assert basis.shape == (16, 4)
    assert correlations[:4].min() > 0.95 and np.abs(correlations[4:]).max() < 0.2, correlations
    kept = {m: (e - mean) @ basis for m, e in embeddings.items()}
    for m in embeddings:
        # the failing case of the same read-out: every direction kept, the private factor is read (it is
        # noise-free against its own direction: ~1.0); the kept directions hold only chance (0.5 ± 3·0.016)
        assert read(embeddings[m], private[m]) > 0.95
        assert read(kept[m], private[m]) < 0.6
    # retrieval keeps working there: each vision row's nearest touch row (cosine) is its own pair
    unit = {m: k / np.linalg.norm(k, axis=1, keepdims=True) for m, k in kept.items()}
    assert (np.argmax(unit["vision"][:200] @ unit["touch"][:200].T, 1) == np.arange(200)).mean() > 0.9


def circle_pairs(n: int, seed: int):
    """Paired 4-number embeddings: a shared class c of 8 sets both modalities' point on a circle (angle 2πc/8) in
    the first two numbers, and vision's private factor p (0 or 1) turns its point along the circle by a tenth of the way
    to the next class, the way lighting scales how bright the wear looks: inside the shared directions, and
    differently for every class, so no direction of the embedding is free of it. Noise of 0.05 (a sixth of the gap
    between classes), and numbers 3 and 4 hold nothing else."""
    rng = np.random.default_rng(seed)
    c, p = rng.integers(0, 8, n), rng.integers(0, 2, n)  # class codes, as the probes read them
    noise = {m: 0.05 * rng.normal(size=(n, 4)) for m in ("vision", "touch")}

    def at(angle):
        return np.c_[np.cos(angle), np.sin(angle), np.zeros((n, 2))]
    step = 2 * np.pi / 8
    vision = at(c * step + 0.1 * step * (2 * p - 1)) + noise["vision"]
    return {"vision": vision, "touch": at(c * step) + noise["touch"]}, c, p


def test_the_cross_prediction_halves_a_private_factor_inside_the_shared_directions():
    """The failing case first: the agreed directions alone keep the circle, and with it vision's private factor,
    which the workbook's non-linear leakage probe reads; predicting touch's coordinates from vision's reads it about
    half as well and keeps the class. Not to chance: a standardising probe reads any difference the fitted map
    leaves between the two sides of a class, however small (the testbed's lighting: 0.17 → 0.14)."""
    (fit, _, _), (held, _, _) = circle_pairs(2000, 0), circle_pairs(500, 1)
    subspace = AgreedSubspace(4, ["vision", "touch"])
    subspace.fit(fit, threshold=0.95, held_out=held)
    assert subspace.kept == 2  # the circle's two numbers agree at ~0.98; the noise numbers at ~0

    def probe_splits(predicted: bool) -> tuple[dict, dict]:
        splits = {split: circle_pairs(n, seed) for split, n, seed in (("fit", 2000, 2), ("select", 500, 3),
                                                                      ("test", 1000, 4))}
        x = {}
        for split, (pairs, _, _) in splits.items():
            unit = torch.nn.functional.normalize(torch.from_numpy(pairs["vision"]).float(), dim=-1)
            coordinates = (unit - subspace.mean) @ subspace.basis
            x[split] = (subspace.predictions["vision"](coordinates) if predicted else coordinates).numpy()
        classes, private = ({split: splits[split][i] for split in splits} for i in (1, 2))
        return x, {"class": probes.Target(False, classes, {s: np.ones(len(v), bool) for s, v in classes.items()}),
                   "private": probes.Target(False, private, {s: np.ones(len(v), bool) for s, v in private.items()})}

    def above_chance(x, targets, name):
        score, chance = probes.probe("non-linear", x, targets)[name]
        return (score - chance) / (1 - chance)
    # at 1000 test rows a normalised accuracy has a standard error of ~0.03: 3 of them either side of the scores
    # measured when this was written (0.88 from the agreed coordinates, 0.47 from the prediction) still part them
    agreed = probe_splits(predicted=False)
    assert above_chance(*agreed, "private") > 0.75
    predicted = probe_splits(predicted=True)
    assert above_chance(*predicted, "private") < 0.6
    assert above_chance(*predicted, "class") > 0.95


def test_without_validation_pairs_the_prediction_is_chosen_on_held_out_training_pairs():
    """A dataset without a validation split (a CSV of training pairs only) still gets its prediction, its settings
    chosen on a fifth of the training pairs: it keeps the class, as with validation pairs."""
    pairs, classes, _ = circle_pairs(500, 0)
    subspace = AgreedSubspace(4, ["vision", "touch"])
    subspace.fit(pairs, threshold=0.95)
    unit = {m: torch.nn.functional.normalize(torch.from_numpy(e).float(), dim=-1) for m, e in pairs.items()}
    whole = torch.ones(len(classes), dtype=torch.bool)
    embedded = {m: subspace(u, m, whole) for m, u in unit.items()}
    assert all(len(p.landmarks) > 0 for p in subspace.predictions.values())
    # each vision row's nearest touch row (cosine) is of its class: classes 0.79 rad apart, noise 0.05
    nearest = (torch.nn.functional.normalize(embedded["vision"], dim=-1) @
               torch.nn.functional.normalize(embedded["touch"], dim=-1).T).argmax(1).numpy()
    assert (classes[nearest] == classes).mean() > 0.95


@pytest.mark.parametrize("overrides, message", [
    (dict(shared_agreement=1.0), r"model.shared_agreement=1.0 is the correlation .* give a number in \[0, 1\)"),
])
def test_bad_agreement_settings_say_what_to_give(overrides, message):
    with pytest.raises(ValueError, match=message):
        core.ModelConfig(**overrides)


def test_a_flow_model_keeps_every_direction_and_says_so():
    """The default sets shared_agreement; `train.py --loss_type combined` (the seed's flags) must still train, with
    its flow head on the embedding it transports, and its saved config must not claim a subspace it does not use."""
    with pytest.warns(UserWarning, match="shared_agreement=0.95 is set to 0: loss_type 'combined' trains a flow head"):
        cfg = core.ModelConfig(shared_agreement=0.95, loss_type="combined")
    assert cfg.shared_agreement == 0


def test_a_trained_run_fits_its_subspace_and_its_checkpoint_keeps_it(cache_dir, tmp_path):
    import train
    cfg = tiny(cache_dir, tmp_path / "run", **{"model.shared_agreement": 0.5})
    run = train.train(cfg)
    model = phase1.load_aligner(run).model
    kept = model.agreed.kept
    assert 1 <= kept < cfg.model.embed_dim  # the tiny run's 32 numbers are not all agreed on
    _, test = phase1.split_data(cfg, "test")
    embeddings = prefixes.encode_all(model, test, [cfg.model.n_shared], reconstruct=False)
    vision = embeddings["vision"].embeddings[cfg.model.n_shared]
    assert torch.all(vision[:, kept:] == 0)  # the dropped directions are exactly zero, not small
    # each modality's cross-prediction came back from the checkpoint: the loaded embedding is not the agreed
    # coordinates themselves
    assert all(len(p.landmarks) > 0 for p in model.agreed.predictions.values())
    # before the fit the subspace is the identity on the unit embedding: what training's validation read
    model.agreed.reset()
    tokens = model.tokens("vision", test["vision"].batch(np.arange(8)))
    unit = torch.nn.functional.normalize(model.design.shared_embedding(model, "vision", tokens), dim=-1)
    torch.testing.assert_close(model.shared_embedding("vision", tokens), unit)


def test_a_checkpoint_saved_before_cross_predictions_loads_as_it_computed(cache_dir, tmp_path):
    """A run folder whose checkpoint holds the agreed subspace without cross-predictions (saved before they existed)
    loads, and embeds in the agreed coordinates themselves, as it did."""
    import run_folder
    import train
    cfg = tiny(cache_dir, tmp_path / "run", **{"model.shared_agreement": 0.5})
    run = run_folder.RunFolder(train.train(cfg))
    weights = {name: value for name, value in run.load_weights().items() if ".predictions." not in name}
    model = phase1.build_model(cfg, weights=weights)
    run_folder.load_trainable(model, weights, run)
    assert model.agreed.kept >= 1 and all(len(p.landmarks) == 0 for p in model.agreed.predictions.values())
    _, test = phase1.split_data(cfg, "test")
    tokens = model.tokens("vision", test["vision"].batch(np.arange(8)))
    unit = torch.nn.functional.normalize(model.design.shared_embedding(model, "vision", tokens), dim=-1)
    agreed = (unit - model.agreed.mean) @ model.agreed.basis
    torch.testing.assert_close(model.shared_embedding("vision", tokens), agreed)
