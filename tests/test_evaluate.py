"""Coarse-to-fine evaluation: the one-pass all-k table equals k truncated passes, recall and chance
against direct counts, probes and leakage on tokens whose content is known, the attention maps, the k
slider's callback without a browser, and the figures drawn from these tables (plots_prefix.py,
plots_training.py)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import core
import evaluate
import information
import plots
import plots_prefix
import plots_training
import prefixes
import retrieval
import widgets
from core import Features, ModelConfig
from data import SynthTouch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run faster on one thread

T, WIDTH = 16, 12  # a 4×4 patch grid, so attention maps can be drawn


def model_of(**overrides) -> core.AlignmentModel:
    values = dict(hidden_dim=32, n_registers=8, n_shared=2, n_layers=2, n_heads=4, embed_dim=16)
    torch.manual_seed(0)
    cfg = ModelConfig(**{**values, **overrides})
    return core.AlignmentModel(cfg, {m: WIDTH for m in cfg.modalities}, {m: T for m in cfg.modalities}).eval()


def features(n=24, seed=0) -> dict[str, Features]:
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, T, 6, generator=g)
    out = {}
    for m in ("vision", "touch"):
        tokens = latent @ torch.randn(6, WIDTH, generator=g) + 0.3 * torch.randn(n, T, WIDTH, generator=g)
        out[m] = Features(tokens.mean(1), tokens, torch.ones(n, T, dtype=torch.bool))
    return out


def factor_table(n=24, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(len(values), size=n) for name, values in SynthTouch.FACTORS.items()}


# ----------------------------------------------------------------------------------------------
# One pass = k truncated passes

@pytest.mark.parametrize("overrides", [dict(design="flextok", attention="joint"),
                                       dict(design="fluxtalk", attention="cross", n_registers=4, n_shared=3,
                                            nested_dropout="linear"),
                                       dict(design="flextok", loss_type="combined", decoder_readout=8)])
def test_all_k_table_from_one_pass_equals_k_truncated_passes(overrides, tmp_path):
    model = model_of(**overrides)
    feats, factors = features(), factor_table()
    one = evaluate.evaluate_prefixes(model, feats, factors, batch_size=10, out_path=tmp_path / "eval.json")
    truncated = evaluate.evaluate_prefixes(model, feats, factors, batch_size=10, one_pass=False)
    assert list(one.index) == model.cfg.prefix_lengths
    pd.testing.assert_frame_equal(one, truncated, atol=1e-5, rtol=1e-5)
    # the embeddings themselves, not only recalls (which could agree by luck on 24 items)
    ks = model.cfg.prefix_lengths
    fast = prefixes.encode_all(model, feats, ks)
    slow = prefixes.encode_all(model, feats, ks, one_pass=False)
    for m in model.cfg.modalities:
        for k in ks:
            torch.testing.assert_close(fast[m].embeddings[k], slow[m].embeddings[k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast[m].recon[k], slow[m].recon[k], atol=1e-5, rtol=1e-5)
        assert fast[m].tokens.shape == (24, model.cfg.n_registers, 32) and slow[m].tokens is None
    expected_columns = {f"{a}->{b} R@{r} {level}" for a, b in (("vision", "touch"), ("touch", "vision"))
                        for r in (1, 5) for level in ("pair", "factor")}
    assert expected_columns <= set(one.columns)
    assert {"vision recon cos", "touch recon cos"} <= set(one.columns)
    assert any(c.endswith(" flow") for c in one.columns) == (model.cfg.loss_type != "contrastive")
    assert evaluate.read_eval(tmp_path / "eval.json").round(6).equals(one.round(6))


def test_the_reference_really_runs_only_k_registers():
    model = model_of()
    feats = features(4)["vision"]
    with torch.no_grad():
        full = model.encoders["vision"](feats.tokens, feats.mask)
        two = model.encoders["vision"](feats.tokens, feats.mask, n_registers=2)
    assert two.shape[1] == 2 and full.shape[1] == 8
    torch.testing.assert_close(two, full[:, :2], atol=1e-5, rtol=1e-5)


def test_adapter_has_one_row_and_eval_restores_train_mode():
    model = model_of(design="adapter", n_registers=1, n_shared=1, nested_dropout="none", preservation_weight=0.0)
    model.train()
    table = evaluate.evaluate_prefixes(model, features(), factor_table())
    assert list(table.index) == [1] and model.training
    with pytest.raises(ValueError, match="outside 1..1"):
        evaluate.evaluate_prefixes(model, features(), None, ks=[2])


def test_mismatched_inputs_fail_clearly():
    model = model_of()
    feats = features()
    with pytest.raises(ValueError, match="lack modalities"):
        evaluate.evaluate_prefixes(model, {"vision": feats["vision"]}, None)
    with pytest.raises(ValueError, match="different numbers of samples"):
        evaluate.evaluate_prefixes(model, {"vision": feats["vision"], "touch": features(10)["touch"]}, None)
    with pytest.raises(ValueError, match="shared factors"):
        evaluate.evaluate_prefixes(model, feats, {"color": np.zeros(24, int)})


# ----------------------------------------------------------------------------------------------
# Recall and chance

def test_recall_counts_hits_in_the_top_r():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.5, 0.6, 0.4]])
    recall = retrieval.recall_at(similarity, torch.eye(3, dtype=torch.bool), ranks=(1, 2))
    assert recall == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}  # row 2's pair is third


def test_factor_match_and_chance_agree_with_a_random_ranking():
    factors = {"texture": np.array([0, 0, 1, 1, 1, 2]), "orientation": np.array([0, 0, 0, 0, 1, 1])}
    relevant = retrieval.factor_match(factors, ["texture", "orientation"])
    assert relevant.sum(1).tolist() == [2, 2, 2, 2, 1, 1]
    chance = retrieval.chance_recall(relevant, ranks=(1, 2))
    g = torch.Generator().manual_seed(0)
    simulated = [retrieval.recall_at(torch.rand(6, 6, generator=g), relevant, ranks=(1, 2)) for _ in range(4000)]
    for r in (1, 2):
        assert chance[r] == pytest.approx(np.mean([s[r] for s in simulated]), abs=0.01)
    assert retrieval.chance_recall(torch.eye(100, dtype=torch.bool))[5] == pytest.approx(0.05)


def test_tvl_top1_is_tvls_symmetric_accuracy_and_a_shuffled_pairing_gives_chance():
    """TVL's touch–vision number (tvl_enc/loss.py): each touch item's nearest vision item by cosine, and each vision
    item's nearest touch item, right when it is its own pair; the two accuracies averaged."""
    g = torch.Generator().manual_seed(0)
    n = 40
    vision = torch.randn(n, 8, generator=g)
    touch = 3 * vision + 2.5 * torch.randn(n, 8, generator=g)  # noisy pairs (3x: cosine ignores scale): some missed
    t, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (touch.numpy(), vision.numpy()))
    touch_to_vision = np.mean([np.argmax([t[i] @ v[j] for j in range(n)]) == i for i in range(n)])
    vision_to_touch = np.mean([np.argmax([v[j] @ t[i] for i in range(n)]) == j for j in range(n)])
    top1 = retrieval.tvl_top1(touch, vision)
    assert top1 == pytest.approx((touch_to_vision + vision_to_touch) / 2) and touch_to_vision != vision_to_touch
    assert 0.3 < top1 < 0.95  # neither trivial nor hopeless, so the comparison above means something
    # Failure: pairs that match perfectly, their pairing shuffled. Row i then finds its old partner, a hit only where
    # the permutation fixes i, in both directions, so the score is (fixed points)/n, whose mean over permutations is
    # 1/n, chance. The number of fixed points of a random permutation has mean 1 and variance 1: over 400 permutations
    # their mean lies within 4 standard errors (4/sqrt(400) = 0.2) of 1.
    assert retrieval.tvl_top1(vision + 0.01 * torch.randn(n, 8, generator=g), vision) == 1.0
    shuffled = [retrieval.tvl_top1(vision[torch.randperm(n, generator=g)], vision) for _ in range(400)]
    assert np.mean(shuffled) * n == pytest.approx(1.0, abs=0.2)


def encoded_from(factors: dict[str, np.ndarray], texture: np.ndarray, noise: float) -> dict:
    """Shared embeddings at k = 1 of both modalities that hold exactly the shared discrete factors (one-hot each),
    with `texture` as what the model reads of the true texture, plus Gaussian noise of std `noise`."""
    def one_hot(textures, g):
        parts = [np.eye(len(SynthTouch.FACTORS[name]))[codes] for name, codes in
                 (("texture", textures), ("orientation", factors["orientation"]), ("roughness", factors["roughness"]))]
        x = torch.tensor(np.concatenate(parts, 1), dtype=torch.float32)
        return x + noise * torch.randn(x.shape, generator=g)
    g = torch.Generator().manual_seed(0)
    return {m: prefixes.Encoded(None, {1: one_hot(texture, g)}, None) for m in ("vision", "touch")}


def test_retrieval_confusion_names_the_values_retrieval_mixes_up():
    factors = factor_table(n=400)
    checker, waves = SynthTouch.FACTORS["texture"].index("checker"), SynthTouch.FACTORS["texture"].index("waves")
    # a model that reads every shared factor: nothing is wrong, every confusion matrix is diagonal
    perfect = retrieval.retrieval_confusion(encoded_from(factors, factors["texture"], 0.01), factors, [1])
    assert (retrieval.top1_differs(perfect, 1) == 0).all()
    # a model that cannot tell checker from waves (it reads both as checker): only those two are mixed up, about
    # half of the queries of either (a tie broken by the noise), and nothing else
    blind = np.where(factors["texture"] == waves, checker, factors["texture"])
    table = retrieval.retrieval_confusion(encoded_from(factors, blind, 0.01), factors, [1])
    counts = retrieval.confusion_matrix(table, 1, "texture")
    assert list(counts.index) == list(counts.columns) == SynthTouch.FACTORS["texture"]
    wrong = counts.to_numpy() * (1 - np.eye(4))
    assert wrong.sum() == wrong[checker, waves] + wrong[waves, checker] and wrong[checker, waves] > 0 < wrong[waves, checker]
    either = np.isin(factors["texture"], [checker, waves]).sum()
    shares = retrieval.top1_differs(table, 1)
    assert 0.3 * either / 400 < shares["texture"] < 0.7 * either / 400  # binomial: ~50% of ~200 queries, ±4 SE
    assert shares["orientation"] == shares["roughness"] == 0
    with pytest.raises(ValueError, match="no confusion counts for k=4.*has k \\[1\\]"):
        retrieval.confusion_matrix(table, 4, "texture")
    # a value no query had and no top-1 was counts 0, not NaN; a value SynthTouch does not have is refused
    without_dots = table[(table["query"] != "dots") & (table["retrieved"] != "dots")]
    assert retrieval.confusion_matrix(without_dots, 1, "texture").loc["dots"].tolist() == [0, 0, 0, 0]
    renamed = table.replace({"retrieved": {"dots": "spots"}})
    with pytest.raises(ValueError, match="values \\['spots'\\] that SynthTouch does not have"):
        retrieval.confusion_matrix(renamed, 1, "texture")


def test_the_top_1_that_is_counted_wrong_is_the_one_r1_judges():
    """Rounded codes tie: the shares must come from the same top-1 as R@1 factor, so that the largest share is at
    most 1 − R@1 and their sum at least (a query misses when it gets at least one factor wrong)."""
    factors = factor_table(n=300, seed=1)
    encoded = encoded_from(factors, factors["texture"], 0.6)
    encoded = {m: e._replace(embeddings={1: e.embeddings[1].round()}) for m, e in encoded.items()}  # many ties
    relevant = {"factor": retrieval.factor_match(factors, retrieval.shared_discrete_factors())}  # as evaluate_prefixes
    recall = retrieval.retrieval_metrics(encoded["vision"].embeddings[1], encoded["touch"].embeddings[1], relevant,
                                         "vision->touch")["vision->touch R@1 factor"]
    shares = retrieval.top1_differs(retrieval.retrieval_confusion(encoded, factors, [1]), 1)
    assert 0.2 < 1 - recall < 0.9  # a model that fails, and the measure says so
    # query by query: the item `nearest` picks is a hit exactly as often as R@1 counts (an argmax would pick
    # other tied items). Recall is a float32 mean of 300 zeros and ones, exact to ~1e-7: compared in queries
    top1 = retrieval.nearest(encoded["vision"].embeddings[1], encoded["touch"].embeddings[1])
    hits = relevant["factor"][torch.arange(300), top1]
    assert hits.sum().item() == round(recall * 300)
    assert shares.max() <= 1 - recall + 1e-6 and shares.sum() >= 1 - recall - 1e-6


def test_a_missing_confusion_table_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="confusion.csv is missing.*re-train"):
        evaluate.read_confusion(tmp_path)


def test_prefix_drops_flags_only_drops_beyond_sampling_noise():
    table = pd.DataFrame({"a->b R@1 pair": [0.30, 0.50, 0.48, 0.60], "a->b R@1 factor": [0.2, 0.6, 0.3, 0.6],
                          "a recon cos": [0.1, 0.2, 0.3, 0.4]}, index=[1, 2, 4, 8])
    drops = evaluate.prefix_drops(table, n_queries=1000)
    assert set(drops.index) == {"a->b R@1 pair", "a->b R@1 factor"}
    small, large = drops.loc["a->b R@1 pair"], drops.loc["a->b R@1 factor"]
    assert small["largest drop"] == pytest.approx(0.02) and not small["any drop beyond noise"]
    assert (large["from k"], large["to k"]) == (2, 4) and large["any drop beyond noise"]
    assert large["noise (z·SE)"] == pytest.approx(2 * np.sqrt((0.6 * 0.4 + 0.3 * 0.7) / 1000))


# ----------------------------------------------------------------------------------------------
# Probes, the information map and leakage, on tokens whose content is known

def planted_tokens(n, seed):
    """Token 0 of each modality encodes texture (shared); token 2 encodes the modality's own private
    factor (vision: color, touch: hardness); everything else is noise. n_shared = 2."""
    rng = np.random.default_rng(seed)
    factors = {name: rng.integers(len(values), size=n) for name, values in SynthTouch.FACTORS.items()}
    factors["phase_x"] = rng.uniform(size=n)
    tokens = {}
    for m, private in (("vision", "color"), ("touch", "hardness")):
        x = rng.normal(size=(n, 4, 8)) * 0.3
        x[np.arange(n), 0, factors["texture"]] += 3
        x[np.arange(n), 2, factors[private]] += 3
        x[:, 1, 6], x[:, 1, 7] = np.cos(2 * np.pi * factors["phase_x"]), np.sin(2 * np.pi * factors["phase_x"])
        tokens[m] = torch.tensor(x, dtype=torch.float32)
    return tokens, factors


def planted_splits(make, rows=(300, 150, 200), **kwargs):
    """(features, factors), each split name ('fit', 'select', 'test') → that split's planted rows."""
    splits = {split: make(n, seed, **kwargs) for seed, (split, n) in enumerate(zip(information.PROBE_SPLITS, rows))}
    return {split: x for split, (x, _) in splits.items()}, {split: f for split, (_, f) in splits.items()}


@pytest.fixture(scope="module")
def info():
    return information.information_map(*planted_splits(planted_tokens), n_shared=2)


def score(info, modality, source, factor):
    return info.set_index(["modality", "source", "factor"]).loc[(modality, source, factor), "score"]


def test_information_map_finds_what_each_token_carries(info):
    assert set(info.source) == {"token 0", "token 1", "token 2", "token 3", "shared", "private", "all"}
    for m, private, other in (("vision", "color", "hardness"), ("touch", "hardness", "color")):
        assert score(info, m, "token 0", "texture") > 0.95 and score(info, m, "token 3", "texture") < 0.45
        assert score(info, m, "token 2", private) > 0.95 and score(info, m, "private", private) > 0.95
        assert score(info, m, "all", private) > 0.95 and score(info, m, "all", "texture") > 0.95
        assert score(info, m, "shared", private) < 0.5 and score(info, m, "private", other) < 0.5
        assert score(info, m, "token 1", "phase_x") > 0.9 and score(info, m, "token 3", "phase_x") < 0.1
    chance = info.set_index(["modality", "source", "factor"]).chance
    assert chance.loc[("vision", "token 0", "phase_x")] == 0.0
    # the test rows' share of the fit rows' most common of 4 uniform values: 1/4 within 3 standard errors of 200 rows
    assert abs(chance.loc[("vision", "token 0", "texture")] - 0.25) < 3 * np.sqrt(0.25 * 0.75 / 200)
    assert info["above chance"].max() <= 1.0 + 1e-9


def test_group_summary_and_leakage_report_chance(info):
    summary = information.group_summary(info)
    assert summary.loc[("shared", "texture", "accuracy"), "touch shared"] > 0.95
    assert summary.loc[("vision", "color", "accuracy"), "vision private"] > 0.95
    assert list(summary.index.get_level_values("group").unique()) == ["shared", "vision", "touch"]
    table = information.leakage(info).set_index("factor")
    assert set(table.index) == {"color", "lighting", "hardness", "pressure"}
    assert table.loc["color", "own private"] > 0.95
    # touch never sees colour: its shared tokens decode it at chance level, nothing leaks
    assert table.loc["color", "other shared (control)"] < table.loc["color", "chance"] + 0.15
    assert table.loc["hardness", "other shared (control)"] < table.loc["hardness", "chance"] + 0.15
    assert table.loc["color", "other modality"] == "touch" and table.loc["hardness", "other modality"] == "vision"


def test_order_by_token_reads_which_kind_of_factor_each_token_holds(info):
    """Kinds are means over their factors, and one factor of each kind is planted: texture of the four coarse
    shared factors (token 0, so ~1/4), the own private one of two (token 2, ~1/2); the rest read at chance (0)
    up to probe noise on 200 test rows (a few hundredths)."""
    order = information.order_by_token(info)
    for m in ("vision", "touch"):
        assert order.loc[(m, "shared · coarse"), 0] > 0.2 > 0.1 > order.loc[(m, "shared · coarse"), 3]
        assert order.loc[(m, "own private · coarse"), 2] > 0.4 > 0.1 > order.loc[(m, "own private · coarse"), 0]
        assert order.loc[(m, "other private · coarse")].max() < 0.1


# ----------------------------------------------------------------------------------------------
# Attention maps, 2-D views

@pytest.mark.parametrize("attention", ["joint", "cross"])
def test_attention_maps_cover_the_patch_grid(attention):
    model = model_of(attention=attention)
    maps = evaluate.attention_maps(model, "vision", features()["vision"], index=3)
    assert maps.shape == (8, 4, 4) and (maps >= 0).all()
    total = maps.sum((1, 2))
    if attention == "cross":
        np.testing.assert_allclose(total, 1, atol=1e-5)
    else:  # joint: the rest goes to registers ≤ i
        assert ((total > 0) & (total < 1)).all()
    with pytest.raises(ValueError, match="no registers"):
        evaluate.attention_maps(model_of(design="adapter", n_registers=1, n_shared=1, nested_dropout="none"),
                                "vision", features()["vision"], 0)


def test_project_2d_keeps_modalities_apart_and_in_order():
    embeddings = {"vision": torch.randn(10, 16), "touch": torch.randn(7, 16)}
    points = evaluate.project_2d(embeddings)
    assert points["vision"].shape == (10, 2) and points["touch"].shape == (7, 2)


# ----------------------------------------------------------------------------------------------
# The k slider, headless

@pytest.fixture(scope="module")
def viewer():
    dataset = SynthTouch(12, seed=0, image_size=32, split="test")
    base = torch.randn(12, 8)
    g = torch.Generator().manual_seed(1)
    # at k = 4 every touch item is its vision pair; at k = 1 the pair sits far away
    embeddings = {"vision": {1: base, 4: base}, "touch": {1: -base + 0.01 * torch.randn(12, 8, generator=g),
                                                         4: base + 0.01 * torch.randn(12, 8, generator=g)}}
    encoded = {m: prefixes.Encoded(None, e, None) for m, e in embeddings.items()}
    return widgets.NeighbourViewer(encoded, dataset, query=3)


def drawn_images(figure):
    return [ax.images[0].get_array() for ax in figure.axes if ax.images]


def test_slider_callback_redraws_the_neighbours_of_that_k(viewer):
    assert list(viewer.slider.options) == [1, 4] and viewer.slider.value == 4
    viewer.slider.value = 4
    assert viewer.neighbours[0] == 3  # own pair first
    images = drawn_images(viewer.figure)
    assert len(images) == 6  # query + 5 neighbours
    np.testing.assert_allclose(images[0], viewer.dataset[3]["vision"].numpy().transpose(1, 2, 0), atol=1e-6)
    np.testing.assert_allclose(images[1], viewer.dataset[3]["touch"].numpy().transpose(1, 2, 0), atol=1e-6)
    texts = [t.get_text() for ax in viewer.figure.axes for t in ax.texts]
    color = viewer.dataset[3]["factors"]["color"]
    assert color in texts and viewer.figure.axes[0].get_ylabel() == "k = 4"
    viewer.slider.value = 1  # the observer fires: a new figure with other neighbours
    assert viewer.neighbours[0] != 3 and 3 not in viewer.neighbours[:1]
    np.testing.assert_allclose(drawn_images(viewer.figure)[1],
                               viewer.dataset[int(viewer.neighbours[0])]["touch"].numpy().transpose(1, 2, 0),
                               atol=1e-6)
    viewer.query.value = 5
    assert viewer.neighbours.tolist() == viewer.neighbours_at(1, 5).tolist()


def test_slider_shows_the_new_figure_as_a_png_image(viewer):
    """The widget the notebook shows is an Image holding a PNG of the current figure; moving k replaces it."""
    import io
    import matplotlib.image
    viewer.slider.value = 4
    at_4 = bytes(viewer.image.value)
    height, width, _ = matplotlib.image.imread(io.BytesIO(at_4), format="png").shape
    assert viewer.image.format == "png" and width > 500 and height > 200
    viewer.slider.value = 1
    assert bytes(viewer.image.value) != at_4


def test_static_row_has_one_row_per_k(viewer):
    figure = viewer.static_figure([4, 1, 4])  # notebook 03 asks for [1, 2, n_shared]: n_shared may be 1 or 2
    assert len(drawn_images(figure)) == 12
    assert [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()] == ["k = 1", "k = 4"]


# ----------------------------------------------------------------------------------------------
# Figures: titles, labels, one colour per factor group

def labelled(figure):
    """A title, and on every panel with data an x label; a y label on the first (panels may share y)."""
    assert figure._suptitle is not None and figure._suptitle.get_text()
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>" and ax.axison
              and (ax.lines or ax.collections or ax.patches or ax.images)]
    assert panels and panels[0].get_ylabel()
    assert all(ax.get_xlabel() for ax in panels), [ax.get_title() for ax in panels if not ax.get_xlabel()]
    return figure


def test_prefix_curves_use_a_log2_axis_and_label_everything():
    tables = {"flextok": pd.DataFrame({"m R@1": [0.1, 0.2, 0.3], "chance@1 pair": [0.01] * 3}, index=[1, 2, 4]),
              "adapter": pd.DataFrame({"m R@1": [0.25], "chance@1 pair": [0.01]}, index=[1])}
    fig = labelled(plots_prefix.prefix_curves(tables, ["m R@1"], "quality vs k", chance={"m R@1": "chance@1 pair"}))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "log2" in ax.get_xlabel()
    assert {line.get_label() for line in ax.lines} >= {"flextok", "adapter (1 token)", "chance"}


def test_information_map_and_leakage_figures_colour_factors_by_group(info):
    from matplotlib.colors import to_hex
    fig = labelled(plots_prefix.information_map(info, n_shared=2))
    labels = {t.get_text(): to_hex(t.get_color()) for t in fig.axes[0].get_yticklabels()}
    for factor, group in SynthTouch.factor_groups.items():
        if factor in labels:
            assert labels[factor] == plots.GROUP_COLORS[group]
    # a score at or below chance is a grey "none", not the colour of a number: exactly those cells are masked
    drawn = fig.axes[0].images[0].get_array()
    vision = info[info.modality == "vision"].pivot(index="factor", columns="source", values="above chance")
    vision = vision.loc[[t.get_text() for t in fig.axes[0].get_yticklabels()], list(dict.fromkeys(info.source))]
    assert (np.ma.getmaskarray(drawn) == (vision.to_numpy() <= 0)).all() and (vision.to_numpy() <= 0).any()
    fig = labelled(plots_prefix.leakage(information.leakage(info)))
    labels = {t.get_text(): to_hex(t.get_color()) for t in fig.axes[0].get_xticklabels()}
    assert labels["color"] == plots.GROUP_COLORS["vision"] and labels["hardness"] == plots.GROUP_COLORS["touch"]


def test_retrieval_failures_figure_has_one_confusion_matrix_per_run():
    factors = factor_table(n=200)
    tables = {"reads texture": retrieval.retrieval_confusion(encoded_from(factors, factors["texture"], 0.01), factors,
                                                             [1]),
              "blind": retrieval.retrieval_confusion(encoded_from(factors, np.zeros(200, int), 0.01), factors, [1])}
    fig = labelled(plots_training.retrieval_failures({n: retrieval.top1_differs(t, 1) for n, t in tables.items()},
                                            {n: retrieval.confusion_matrix(t, 1, "texture") for n, t in tables.items()},
                                            "texture", {"reads texture": 1.0, "blind": 0.27}))
    bars, *matrices = fig.axes
    assert [ax.get_title() for ax in matrices] == list(tables) and all(len(ax.images) == 1 for ax in matrices)
    assert len(bars.patches) == 2 * 3 and "R@1 factor 0.270" in bars.get_legend().get_texts()[1].get_text()


def test_attention_and_embedding_figures():
    model = model_of()
    feats = features()
    image = torch.rand(3, 32, 32)
    maps = evaluate.attention_maps(model, "vision", feats["vision"], 0)
    fig = plots_prefix.attention_maps({"vision": (image, maps), "touch": (image, maps)}, n_show=4)
    assert fig._suptitle.get_text() and sum(len(ax.images) == 2 for ax in fig.axes) == 8
    points = evaluate.project_2d({"vision": torch.randn(24, 16), "touch": torch.randn(24, 16)})
    names = {n: v for n, v in SynthTouch.FACTORS.items()}
    labelled(plots_prefix.embedding_views(points, factor_table(), ["texture", "color"], names))


def test_eval_json_is_plain_json(tmp_path):
    evaluate.evaluate_prefixes(model_of(), features(), None, ks=[1, 8], out_path=tmp_path / "eval.json")
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert list(rows) == ["1", "8"] and "vision->touch R@1 pair" in rows["1"] and "chance@1 pair" in rows["8"]


# ----------------------------------------------------------------------------------------------
# Leakage by k: a measure that reports failure for a model built to leak, and none for one built not to

def planted_encoded(n, seed, leak: str):
    """Encoded outputs of a 4-register model (n_shared 2) whose content is known: shared token 0 holds
    texture, private token 2 holds the modality's own private factor, and the shared tokens also hold it
    when `leak` is 'linear' (one-hot) or 'xor' (as signs of products of feature pairs, each feature alone
    independent of the factor: a linear probe cannot read it, a non-linear one can); 'none' leaks nothing."""
    rng = np.random.default_rng(seed)
    factors = {name: rng.integers(len(values), size=n) for name, values in SynthTouch.FACTORS.items()}
    encoded = {}
    for m, private in (("vision", "color"), ("touch", "hardness")):
        x = rng.normal(size=(n, 4, 16)) * 0.3
        x[np.arange(n), 0, factors["texture"]] += 3
        x[np.arange(n), 2, factors[private]] += 3
        if leak == "linear":
            x[np.arange(n), 1, factors[private]] += 3
        elif leak == "xor":  # per class c, features 2c and 2c+1 of token 1: a random sign s and ±s (+ when c)
            for c in range(len(SynthTouch.FACTORS[private])):
                sign = rng.choice([-1.0, 1.0], size=n)
                x[:, 1, 2 * c], x[:, 1, 2 * c + 1] = sign, sign * np.where(factors[private] == c, 1.0, -1.0)
        tokens = torch.tensor(x, dtype=torch.float32)
        embeddings = {k: tokens[:, :min(k, 2)].mean(1) for k in (1, 2, 4)}
        encoded[m] = prefixes.Encoded(tokens, embeddings, None)
    return encoded, factors


@pytest.mark.parametrize("leak", ["none", "linear", "xor"])
def test_leakage_by_k_reports_failure_only_for_a_leaking_model(leak):
    model = model_of(n_registers=4, n_shared=2)
    # 600 fitting rows: the kernel probe reads the xor leak's sign products from them (1 core-second a source)
    encoded, factors = planted_splits(planted_encoded, (600, 200, 400), leak=leak)
    # k = 2 (all shared tokens; the planted leak sits in token 1) and 4 (private tokens too): k = 1 would only
    # add probes of token 0, which leaks in no case (every k of a run: test_study, eval.json)
    table = information.leakage_by_k(model, encoded, factors, ks=[2, 4], names=["texture", "color", "hardness"])
    assert set(table.k) == {2, 4} and set(table.probe) == {"linear", "non-linear"}
    summary = information.leakage_summary(table)
    at_shared = summary.xs(2, level="k")
    if leak == "none":  # 0.15: the bar, about 5 standard errors of chance accuracy on 400 samples
        assert (at_shared["leak into shared tokens (max)"] < 0.15).all()
    else:
        assert (at_shared["leak into shared tokens (max)"] > 0.5).all()
    linear = information.leakage_summary(table, probe="linear").xs(2, level="k")["leak into shared tokens (max)"]
    if leak == "xor":  # hidden from a linear read-out, so a linear-only measure would call it clean
        assert (linear < 0.15).all()
    # the parts that do not depend on leaking: private tokens know their factor, the shared embedding texture
    assert (summary.xs(4, level="k")["own private from private tokens (mean)"] > 0.4).all()
    assert (at_shared["shared factors from shared embedding (mean)"] > 0.15).all()
    controls = table[(table.role == "other private (control)") & (table.k == 2)]
    assert (controls.normalised < 0.15).all()  # the other modality's private factors are never in these tokens


def test_probes_fit_in_parallel_processes_give_the_scores_of_one_process():
    """Evaluation fits its probes in as many processes as torch has threads (a demo run: two). Every fit is
    the same one-thread problem either way; only BLAS's handling of how an array happens to sit in memory may
    differ between processes, which can move an R² by float rounding (1e-6 allows for it) or flip a prediction
    that sits on a decision boundary (so an accuracy may move by one test row, 1/200)."""
    tokens, factors = planted_splits(planted_tokens, (200, 100, 200))
    tokens = {split: {"vision": x["vision"]} for split, x in tokens.items()}
    maps, threads = [], torch.get_num_threads()
    try:
        for processes in (2, 1):
            torch.set_num_threads(processes)
            maps.append(information.information_map(tokens, factors, n_shared=2))
    finally:
        torch.set_num_threads(threads)
    assert maps[0].drop(columns=["score", "above chance"]).equals(maps[1].drop(columns=["score", "above chance"]))
    assert np.allclose(maps[0].score, maps[1].score, rtol=0, atol=np.where(maps[0].chance > 0, 1 / 200 + 1e-12, 1e-6))
    assert (maps[0]["above chance"] > 0.5).sum() >= 4  # texture and phase of their tokens: not equal failures


def test_the_ridge_read_out_finds_what_the_tokens_hold_of_the_features_and_nothing_more():
    """Frozen features that are a linear function of the four tokens: read from all of them at cosine near 1, from
    the first alone at what that token explains; features unrelated to the tokens read at cosine near 0."""
    rng = np.random.default_rng(0)
    rows = dict(fit=400, select=150, test=200)
    mixing = rng.normal(size=(4 * 8, 6 * 16))
    tokens, linear, unrelated = {}, {}, {}
    for split, n in rows.items():
        tokens[split] = torch.tensor(rng.normal(size=(n, 4, 8)), dtype=torch.float32)
        mean = rng.normal(size=(1, 6, 16))  # what every sample shares: both cosines are measured from it
        made = tokens[split].flatten(1).numpy() @ mixing
        for out, x in ((linear, made), (unrelated, rng.normal(size=made.shape))):
            x = torch.tensor(x.reshape(n, 6, 16) + mean, dtype=torch.float32)
            out[split] = Features(x.mean(1), x, torch.ones(n, 6, dtype=torch.bool))
    read = evaluate.readout_cosine(tokens, linear, [1, 4])
    assert read[4] > 0.95  # exact up to the ridge's shrinkage and the split means measured from (200 rows each)
    # one token of four explains about a quarter of each feature's variance: cosine about sqrt(1/4)
    assert 0.35 < read[1] < 0.65
    nothing = evaluate.readout_cosine(tokens, unrelated, [4])
    assert abs(nothing[4]) < 0.1  # the strength chosen on held-out rows shrinks a read-out of noise to the mean
