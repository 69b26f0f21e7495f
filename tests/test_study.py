"""The statistics command: runs per (variant, seed) with leakage in eval.json, mean ± std per variant."""
import json

import pandas as pd
import pytest

import study
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    table = study.study(["default", "no nested dropout"], [0, 1], root,
                        **{**TINY, "cache_dir": str(cache_dir), "leakage_probes": True})
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


def test_one_row_per_run_and_mean_pm_std_per_variant(rows):
    root, table = rows
    assert list(zip(table.variant, table.seed)) == [("default", 0), ("default", 1), ("no nested dropout", 0),
                                                     ("no nested dropout", 1)]
    assert table["R@1 pair, k=1"].between(0, 1).all()
    # another seed is another run: the numbers differ (identical ones would mean the seed was ignored)
    assert table.iloc[0]["vision recon cos, k=4"] != table.iloc[1]["vision recon cos, k=4"]
    summary = study.summarise(table)
    assert list(summary.columns) == ["default", "no nested dropout"]
    mean = table[table.variant == "default"]["R@1 pair, k=2"].mean()
    assert summary.loc["R@1 pair, k=2", "default"].startswith(f"{mean:.3f} ± ")
    assert summary.loc["seeds", "default"] == 2
    path = study.write(table, root)
    assert "no nested dropout" in path.read_text() and (root / "runs.csv").is_file()


def test_a_finished_study_is_read_back_without_training(rows, cache_dir, monkeypatch):
    root, table = rows
    monkeypatch.setattr(study.train, "train", lambda *a, **k: pytest.fail("trained a finished run again"))
    again = study.study(["default"], [0], root, **{**TINY, "cache_dir": str(cache_dir), "leakage_probes": True})
    assert again.iloc[0].equals(table.iloc[0])


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="no leakage guard"):
        study.run_config("no such variant", 0)
