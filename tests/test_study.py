"""The statistics command: runs per (variant, seed) with leakage in eval.json, mean ± std per variant."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import evaluate
import information
import phase1
import plots
import plots_training
import prefixes
import retrieval
import study
import train
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows(cache_dir, tmp_path_factory):
    """Three tiny runs: the default on two seeds (a mean ± std) with the leakage probes, and another variant on
    one seed without them (what most of a tiny run's time goes to), whose numbers read as missing."""
    root = tmp_path_factory.mktemp("study")
    overrides = {**TINY, "cache_dir": str(cache_dir)}
    table = pd.concat([study.study(["default"], [0, 1], root, **{**overrides, "leakage_probes": True}),
                       study.study(["no nested dropout"], [0], root, **overrides)], ignore_index=True)
    return root, table


def test_each_run_is_a_run_folder_with_leakage_at_every_k(rows):
    root, _ = rows
    run = root / "default" / "seed-1"
    evaluation = json.loads((run / "eval.json").read_text())
    assert list(evaluation) == ["1", "2", "4"]  # TINY: 4 registers, 2 shared
    for row in evaluation.values():
        for m in ("vision", "touch"):
            for probe in ("linear", "non-linear"):
                assert -1.5 < row[f"{m} leak into shared embedding (max) [{probe}]"] <= 1.0
    leaks = pd.read_csv(run / "leakage.csv")
    assert set(leaks.source) == {"shared tokens", "shared embedding", "private tokens"}
    assert {"color", "stain", "hardness", "compliance", "wear"} <= set(leaks.factor)


def test_the_information_map_is_written_beside_eval_json_and_read_back(rows):
    run = rows[0] / "default" / "seed-0"
    saved = evaluate.read_information(run)
    # the same map, recomputed from the saved weights on the same splits (training rows fit, validation tunes,
    # test scores)
    cfg = phase1.load_config(run / "config.yaml")
    model, ks = phase1.load_aligner(run).model, [cfg.model.n_registers]
    tokens, factors = {}, {}
    for split, name in zip(information.PROBE_SPLITS, ("train", "val", "test")):
        dataset, feats = phase1.split_data(cfg, name)
        index = information.fit_rows(len(dataset)) if split == "fit" else np.arange(len(dataset))
        encoded = prefixes.encode_all(model, {m: f.batch(index) for m, f in feats.items()}, ks)
        tokens[split] = {m: e.tokens for m, e in encoded.items()}
        factors[split] = {name: np.asarray(v)[index] for name, v in dataset.factor_table().items()}
    again = information.information_map(tokens, factors, cfg.model.n_shared)
    assert list(saved.columns) == list(again.columns) and len(saved) == len(again)
    assert (saved.source.unique() == again.source.unique()).all()
    # same process, same inputs, same probes: equal up to the CSV's decimal round trip (17 significant digits)
    assert np.allclose(saved.score, again.score, rtol=0, atol=1e-12)
    with pytest.raises(FileNotFoundError, match="information.csv is missing"):
        evaluate.read_information(rows[0])


def test_one_row_per_run_and_mean_pm_std_per_variant(rows):
    root, table = rows
    assert list(zip(table.variant, table.seed)) == [("default", 0), ("default", 1), ("no nested dropout", 0)]
    assert table["R@1 pair, k=1"].between(0, 1).all()
    # another seed is another run: the numbers differ (identical ones would mean the seed was ignored)
    assert table.iloc[0]["vision recon cos, k=all"] != table.iloc[1]["vision recon cos, k=all"]
    summary = study.summarise(table)
    assert list(summary.columns) == ["default", "no nested dropout"]
    mean = table[table.variant == "default"]["R@1 pair, k=n_shared"].mean()
    assert summary.loc["R@1 pair, k=n_shared", "default"].startswith(f"{plots.significant(mean)} ± ")
    assert summary.loc["seeds", "default"] == 2 and summary.loc["seeds", "no nested dropout"] == 1
    assert " ± " not in summary.loc["R@1 pair, k=n_shared", "no nested dropout"]  # one seed has no spread
    leak = "vision leak into shared embedding (max), k=n_shared"
    assert summary.loc[leak, "no nested dropout"] == "–" and summary.loc[leak, "default"] != "–"
    path = study.write(table, root)
    assert "no nested dropout" in path.read_text() and (root / "runs.csv").is_file()


def test_a_spread_smaller_than_a_thousandth_is_shown_not_rounded_to_zero():
    """The worst-k gap of three seeds (0.0073, 0.0070, 0.0066) spreads by 0.00035: "± 0" would say the seeds agree
    exactly, which only identical numbers do."""
    rows = pd.DataFrame({"variant": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                         "gap": [0.0073, 0.0070, 0.0066, 0.5, 0.5, 0.5]})
    summary = study.summarise(rows)
    assert summary.loc["gap", "a"] == "0.00697 ± 0.000351" and summary.loc["gap", "b"] == "0.5 ± 0"


def test_a_finished_study_is_read_back_without_training(rows, cache_dir, monkeypatch):
    root, table = rows
    monkeypatch.setattr(study.train, "train", lambda *a, **k: pytest.fail("trained a finished run again"))
    again = study.study(["default"], [0], root, **{**TINY, "cache_dir": str(cache_dir), "leakage_probes": True})
    assert again.iloc[0].equals(table.iloc[0])


def test_finished_runs_come_from_your_study_and_otherwise_from_the_reference(rows, tmp_path, monkeypatch):
    root, table = rows
    monkeypatch.setattr(study, "REFERENCE", tmp_path / "reference")
    with pytest.raises(FileNotFoundError, match="python study.py --variants 'default' --seeds 2"):
        study.finished_run("default", 2, tmp_path / "nothing trained here")
    with pytest.raises(FileNotFoundError, match="no leakage.csv, information.csv.*leakage_probes: true"):
        study.save_reference(table[2:])  # trained without the probes: not a reference
    study.save_reference(table[:2])  # seeds 0 and 1: the reference keeps seed 0's
    copied = sorted(p.relative_to(study.REFERENCE).as_posix() for p in study.REFERENCE.rglob("*") if p.is_file())
    assert copied == sorted(f"default/seed-0/{name}" for name in
                            (*study.REFERENCE_FILES, *study.LATER_REFERENCE_FILES, "information.csv"))
    own = root / "default" / "seed-0"
    assert study.finished_run("default", 0, root) == own  # your own run first
    reference = study.finished_run("default", 0, tmp_path / "nothing trained here")
    assert reference == study.REFERENCE / "default" / "seed-0"
    # the reference holds what the notebooks read of a run, and gives the same numbers; not the rows of every step
    assert evaluate.read_eval(reference / "eval.json").equals(evaluate.read_eval(own / "eval.json"))
    assert evaluate.read_information(reference).equals(evaluate.read_information(own))
    assert evaluate.read_confusion(reference).equals(evaluate.read_confusion(own))
    assert train.training_minutes(reference) == train.training_minutes(own)
    assert {row["kind"] for row in train.read_metrics(reference)} == {"epoch"}
    # a folder without confusion.csv is passed over when a notebook needs it; the reference is taken instead
    (own / "confusion.csv").rename(own / "confusion.csv.away")
    try:
        assert study.finished_run("default", 0, root) == own
        assert study.finished_run("default", 0, root, needs=("confusion.csv",)) == reference
    finally:
        (own / "confusion.csv.away").rename(own / "confusion.csv")


def test_the_reference_results_are_sized_to_what_the_notebooks_read():
    """docs/study keeps summaries (seed 0's tables, epoch rows), not every training row: 2 MB at most."""
    files = [p for p in study.REFERENCE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 2 * 2 ** 20
    assert {p.parent.name for p in files if p.parent != study.REFERENCE} == {f"seed-{study.REFERENCE_SEED}"}


@pytest.mark.parametrize("variant", list(study.VARIANTS))
def test_the_reference_results_are_of_todays_config(variant):
    """Every seed the reference holds of a variant (at least one) was trained with the settings study.VARIANTS gives
    today but for study.REFERENCE_CONFIG (an older default's), and holds the tables the notebooks read."""
    seeds = [s for s in study.SEEDS if (study.run_config(variant, s, study.REFERENCE).run_dir / "eval.json").is_file()]
    assert seeds, f"the reference has no run of {variant!r}; python study.py --variants '{variant}' --seeds 0 --reference"
    for seed in seeds:
        run = study.finished_run(variant, seed, "nothing trained here")
        assert run.is_relative_to(study.REFERENCE) and all((run / name).is_file() for name in study.REFERENCE_FILES)
        saved = phase1.load_config(run / "config.yaml")
        today = study.run_config(variant, seed, study.REFERENCE, **study.REFERENCE_CONFIG)
        where = {name: getattr(today, name) for name in train.RESUME_IGNORES}  # where it ran, not what it trained
        assert dataclasses.replace(saved, **where) == today, (
            f"{run} was trained with other settings than study.VARIANTS[{variant!r}] now gives; refresh it with "
            f"python study.py --variants '{variant}' --seeds {seed} --reference")
        numbers = study.headline(run)
        assert 0 < numbers["R@1 factor, k=n_shared"] <= 1 and numbers["n_shared"] <= numbers["n_registers"]


# what notebook 03 reads: the design closest to the target corner, by the reference's trade-off
@pytest.mark.parametrize("variant", [study.closest_to_target(study.tradeoff(pd.read_csv(study.REFERENCE / "runs.csv")))])
def test_the_reference_confusion_counts_are_of_the_runs_own_top_1(variant):
    """confusion.csv of reference runs was computed later, from the runs' weights: it must be of the same top-1 as
    the run's own R@1 factor in eval.json: the largest share wrong at most 1 − R@1, and their sum at least that."""
    run = study.finished_run(variant, study.REFERENCE_SEED, "nothing trained here")
    confusion, table = evaluate.read_confusion(run), evaluate.read_eval(run / "eval.json")
    for k in table.index:
        for direction in ("vision->touch", "touch->vision"):
            shares, miss = retrieval.top1_differs(confusion, k, direction), 1 - table.loc[k, f"{direction} R@1 factor"]
            # recall is a float32 mean of 1000 zeros and ones (exact to ~1e-7), the shares exact fractions
            assert shares.max() <= miss + 1e-6 and shares.sum() >= miss - 1e-6, (k, direction)


def test_the_notebooks_study_table_groups_variants_by_family():
    rows = pd.read_csv(study.REFERENCE / "runs.csv")
    table = study.summary_table(rows)
    families = list(table.index.get_level_values("family"))
    assert families == sorted(families, key=families.index)  # each family's variants together
    assert set(table.index.get_level_values("variant")) == set(study.VARIANTS)
    default = rows[rows.variant == "default"]["R@1 factor, k=n_shared"]
    assert table.loc[("the default", "default"), "R@1 factor, k=n_shared"] == \
        f"{plots.significant(default.mean())} ± {plots.significant(default.std())}"


def test_the_notebooks_study_table_in_parts_shows_every_number_once_at_most_four_wide():
    rows = pd.read_csv(study.REFERENCE / "runs.csv")
    whole, parts = study.summary_table(rows), study.summary_parts(rows)
    shown = []
    for title, part in parts.items():
        assert part.index.equals(whole.index), title
        # a "mean ± std" column is 12-16 characters wide; "4 ± 0" registers or "3" seeds are narrow
        assert sum(part[column].str.len().max() > 8 for column in part) <= 4, title
        for column in part:
            modality, header = column if isinstance(column, tuple) else ("", column)
            name = f"{modality} {study.SUMMARY_PARTS[title][header]}".strip()
            assert list(part[column].str.replace("\u00a0", " ")) == list(whole[name].astype(str)), name
            shown.append(name)
    assert sorted(shown) == sorted(whole.columns)  # each number in one part, none left out


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="no leakage guard"):
        study.run_config("no such variant", 0)


def test_the_tradeoff_takes_each_runs_worse_modality_then_mean_and_std_over_seeds(tmp_path):
    leak_v, leak_t = "vision leak into shared embedding (max), k=n_shared", "touch leak into shared embedding (max), k=n_shared"
    rows = pd.DataFrame({"variant": ["FSQ tokens", "default", "default", "adapter design"], "seed": [0, 0, 1, 0],
                         leak_v: [0.05, 0.6, 0.2, np.nan], leak_t: [0.10, 0.3, 0.4, np.nan],
                         study.RETRIEVAL: [0.6, 0.9, 0.8, 0.1]})
    table = study.tradeoff(rows)
    assert list(table.index) == ["default", "FSQ tokens"]  # study order; no leakage number (adapter): left out
    # per run the worse modality (0.6, then 0.4), then over seeds: a leaky design reads as leaky
    assert table.loc["default", study.LEAK] == pytest.approx(0.5)
    assert table.loc["default", f"{study.LEAK} std"] == pytest.approx(np.std([0.6, 0.4], ddof=1))
    assert table.loc["FSQ tokens", study.LEAK] == pytest.approx(0.10) and table.loc["default", "seeds"] == 2
    # your runs replace the reference's for the variants you trained, the reference fills in the rest
    rows.to_csv(tmp_path / "runs.csv", index=False)
    merged = study.read_rows(tmp_path)
    reference = pd.read_csv(study.REFERENCE / "runs.csv")
    assert (merged.variant == "default").sum() == 2 and set(merged.variant) == set(reference.variant)


def test_the_design_closest_to_the_target_and_the_tradeoff_in_words():
    """Notebook 03 names the design nearest the target corner and states the trade-off from the table, not by hand."""
    leak, r1 = study.TARGET[study.LEAK], study.TARGET[study.RETRIEVAL]
    table = pd.DataFrame({study.LEAK: [leak + 0.3, leak - 0.05, leak - 0.1, leak + 0.01],
                          study.RETRIEVAL: [r1 + 0.05, r1 - 0.02, r1 - 0.2, r1 - 0.01], "seeds": [3, 3, 1, 3]},
                         index=["leaky", "near", "far", "nearest"])
    table[f"{study.LEAK} std"] = table[f"{study.RETRIEVAL} std"] = [0.01, 0.01, np.nan, 0.01]
    assert study.distance_to_target(table).loc["nearest"] == pytest.approx(np.hypot(0.01, 0.01))
    assert study.closest_to_target(table) == "nearest"
    words = study.tradeoff_summary(table)
    assert f"Leakage within {leak}: near, far." in words and "No design is inside" in words
    assert f"**near** (R@1 {r1 - 0.02:.3f} ± 0.010" in words and "**far** (R@1" not in words  # its R@1 is lower
    inside = table.assign(**{study.RETRIEVAL: table[study.RETRIEVAL] + 0.1})
    assert study.closest_to_target(inside) == "near"  # both inside the corner: the one retrieving more
    assert "Inside the target corner: **near**" in study.tradeoff_summary(inside)


def test_every_design_in_the_tradeoff_figure_looks_different_past_twenty():
    from matplotlib.colors import to_hex
    names = [f"design {i}" for i in range(23)]  # more designs than the 20 colours of the palette
    table = pd.DataFrame({study.LEAK: np.linspace(0, 0.9, 23), study.RETRIEVAL: 0.5, "seeds": 1}, index=names)
    fig = plots_training.tradeoff(table, study.LEAK, study.RETRIEVAL, target_x=0.15, target_y=0.9)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == names
    assert len({(to_hex(h.get_color()), h.get_marker()) for h in legend.legend_handles}) == len(names)


def test_the_tradeoff_figure_gives_a_family_one_colour_and_its_designs_markers():
    from matplotlib.colors import to_hex
    table = study.tradeoff(pd.read_csv(study.REFERENCE / "runs.csv").assign(source="reference"))
    fig = plots_training.tradeoff(table, study.LEAK, study.RETRIEVAL, 0.15, 0.9, study.family)
    legend = fig.legends[0]
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    families = set(map(study.family, table.index))
    assert families <= set(entries) and "other" not in families  # every variant of the study has its family
    designs = {name.split(" (")[0]: h for name, h in entries.items() if name not in families}
    assert set(designs) == set(table.index) and all("reference" in name for name in entries if name not in families)
    for f in families:
        members = [designs[name] for name in table.index if study.family(name) == f]
        assert len({to_hex(h.get_color()) for h in members}) == 1 and len({h.get_marker() for h in members}) == len(members)
    assert len({to_hex(designs[name].get_color()) for name in ("default", "FSQ tokens", "no leakage guard")}) == 3


def test_a_study_of_some_variants_or_seeds_adds_to_the_table_in_study_order(tmp_path):
    """`python study.py --variants V --seeds S` (and --reference) replaces the rows of those runs in runs.csv and
    keeps every other run's, so adding seeds to one variant never drops the rest of the table."""
    pd.DataFrame({"variant": ["FSQ tokens", "default", "default"], "seed": [0, 0, 1], "x": [1, 2, 3]}).to_csv(
        tmp_path / "runs.csv", index=False)
    new = pd.DataFrame({"variant": ["FSQ tokens", "default"], "seed": [1, 1], "x": [4, 5]})
    rows = study.merge_rows(new, tmp_path / "runs.csv")
    assert list(zip(rows.variant, rows.seed, rows.x)) == [("default", 0, 2), ("default", 1, 5), ("FSQ tokens", 0, 1),
                                                          ("FSQ tokens", 1, 4)]
    assert study.merge_rows(new, tmp_path / "no study here" / "runs.csv").equals(new)


def test_a_run_says_which_testbed_it_was_trained_on(tmp_path):
    """The reference runs were trained on an older SynthTouch than today's: notebook 03 says so beside each run."""
    assert study.testbed_of(study.finished_run("default", 0, tmp_path)) == study.REFERENCE_TESTBED
    assert study.results_of(study.finished_run("default", 0, tmp_path)) == "reference"
    assert study.results_of(tmp_path / "default" / "seed-0") == "yours"
    assert study.labelled({"default": study.finished_run("default", 0, tmp_path), "mine": tmp_path / "default"}) == \
        {"default (reference)": study.finished_run("default", 0, tmp_path), "mine": tmp_path / "default"}
    assert study.testbed_of(tmp_path / "default" / "seed-0") == evaluate.SynthTouch.VERSION != study.REFERENCE_TESTBED


def test_targets_are_read_from_a_runs_tables_and_written_by_the_command_line(rows, tmp_path, capsys):
    root, _ = rows
    runs = [root / "default" / f"seed-{s}" for s in (0, 1)]
    numbers = study.targets(runs[0])
    table = evaluate.read_eval(runs[0] / "eval.json")
    assert numbers["vision recon cos rise, k=1 to all"] == table.at[4, "vision recon cos"] - table.at[1, "vision recon cos"]
    assert numbers["touch decoder minus ridge read-out, worst k"] == (table["touch recon cos"] - table["touch readout cos"]).min()
    # the rise of R@1 in standard errors of a difference of two recalls on the test split's queries
    p1, p2, n = table.at[1, "vision->touch R@1 pair"], table.at[2, "vision->touch R@1 pair"], TINY["n_test"]
    assert numbers["vision->touch R@1 pair rise, k=1 to n_shared, in standard errors"] == pytest.approx(
        (p2 - p1) / np.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n))
    info = evaluate.read_information(runs[0]).set_index(["modality", "source", "factor"]).score
    assert numbers["vision stain from all tokens"] == info[("vision", "all", "stain")]
    assert numbers["touch wear gain over the shared tokens"] == info[("touch", "all", "wear")] - info[("touch", "shared", "wear")]
    assert "vision compliance from all tokens" not in numbers  # vision never sees compliance
    study.main(["--targets", *map(str, runs), "--out", str(tmp_path)])
    written = (tmp_path / "targets.md").read_text()
    assert capsys.readouterr().out.strip() == written.strip() and "R@1 factor, k=n_shared" in written and " ± " in written
