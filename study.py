"""The statistics behind the headline numbers: the default model and its variants, each trained with several
seeds on SynthTouch and measured on the test split, reported as mean ± std.

    python study.py                                       # every variant × seeds 0 1 2 -> runs/study/
    python study.py --variants default "no nested dropout" --seeds 0 1 2 --jobs 2

Each (variant, seed) is an ordinary phase-1 run folder (runs/study/<variant>/seed-<s>), trained by
train.ensure_trained, so an interrupted study continues where it stopped and a finished run is never
trained twice. Epochs and weights were chosen on the validation split; the test split is only read here.
Writes runs/study/runs.csv (one row per run) and runs/study/study.md (mean ± std per variant).

The notebooks compare the default model with these variants. `make demo` trains only the default; the
variants' curves and tables come from `runs/study` when you have trained them, and otherwise from the
reference results in docs/study (seed 0 of each variant: what the notebooks read of a run, no weights and no
per-step rows; every seed's headline numbers in docs/study/runs.csv), which `--reference` writes:

    python study.py --seeds 0 --reference                 # train seed 0 of every variant, refresh docs/study

A run's probes are fit on 2000 training rows, tuned on the validation split and scored on the test split
(probes.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import encoders
import evaluate
import phase1
import plots
import plots_prefix
import retrieval
import train

# FSQ on the shared tokens with a 12-number code (FlexTok's levels twice)
FSQ_SHARED_12 = {"model.token_dim": 12, "model.token_levels": [8, 8, 8, 5, 5, 5] * 2, "model.bottleneck_tokens": "shared"}

EVERY_DIRECTION = {"model.shared_agreement": 0.0}  # the shared embedding as training made it (agreement.py)

# name -> overrides of configs/default.yaml. The default carries the leakage design the workbook adopted (a
# stop-gradient, the alignment term and the agreed subspace); the guards below replace it, each alone, so they are
# compared on the same data, features and budget.
VARIANTS = {
    "default": {},
    "no nested dropout": {"model.nested_dropout": "none"},
    "no leakage guard": {"model.leakage_guard": "none", "model.alignment_weight": 0.0, **EVERY_DIRECTION},
    "stop-gradient": {"model.leakage_guard": "stopgrad", "model.alignment_weight": 0.0, **EVERY_DIRECTION},
    "cross-modal reconstruction": {"model.leakage_guard": "cross", "model.alignment_weight": 0.0, **EVERY_DIRECTION},
    "decorrelation": {"model.leakage_guard": "decorrelate", "model.alignment_weight": 0.0, **EVERY_DIRECTION},
    "token bottleneck": {"model.token_dim": 8},  # the default with 8 numbers per token: less leaks, less retrieved
    # FlexTok's token format: each token 6 numbers rounded to 8·8·8·5·5·5 levels (FSQ), so no small leftover of
    # a private factor survives in it
    "FSQ tokens": {"model.token_dim": 6, "model.token_levels": [8, 8, 8, 5, 5, 5]},
    "FSQ shared tokens": {"model.token_dim": 6, "model.token_levels": [8, 8, 8, 5, 5, 5],
                          "model.bottleneck_tokens": "shared"},  # the private tokens stay continuous
    # the same, trained on unrounded (tanh-bounded) codes for the first half of training: is rounding what
    # slows alignment down, or the 6-number code itself?
    "FSQ shared tokens warm-up": {"model.token_dim": 6, "model.token_levels": [8, 8, 8, 5, 5, 5],
                                  "model.bottleneck_tokens": "shared", "model.round_after": 0.5},
    # its `none` ablation: does nested dropout still beat (or tie) training on all tokens at every k?
    "FSQ shared tokens no nested dropout": {"model.token_dim": 6, "model.token_levels": [8, 8, 8, 5, 5, 5],
                                            "model.bottleneck_tokens": "shared", "model.nested_dropout": "none"},
    # wider FSQ codes for the shared tokens (12 and 24 numbers instead of 6, the same levels repeated): is the
    # 6-number code what caps retrieval, and how much more leaks through a wider one?
    "FSQ shared tokens 12-number code": FSQ_SHARED_12,
    "FSQ shared tokens 24-number code": {"model.token_dim": 24, "model.token_levels": [8, 8, 8, 5, 5, 5] * 4,
                                         "model.bottleneck_tokens": "shared"},
    # rounded codes learn slowly (factor-level R@1 still rising on the validation split after 14 epochs): the
    # 12-number code with twice the training
    "FSQ shared tokens 12-number code 28 epochs": {**FSQ_SHARED_12, "epochs": 28},
    "FSQ shared tokens 12-number code 42 epochs": {**FSQ_SHARED_12, "epochs": 42},  # does three times still pay?
    # ... and trained on unrounded codes for its first half, as "FSQ shared tokens warm-up" does the 6-number code
    "FSQ shared tokens 12-number code 28 epochs warm-up": {**FSQ_SHARED_12, "epochs": 28, "model.round_after": 0.5},
    # the other nested-dropout modes, and the three design lines of the SPEC on the testbed's features and width
    "uniform nested dropout": {"model.nested_dropout": "uniform"},
    "linear nested dropout": {"model.nested_dropout": "linear"},
    **{f"{design} design": phase1.design_overrides(design) for design in ("flextok", "fluxtalk", "adapter")},
}
# what kind of change each variant makes to the default: the trade-off figure gives a family one colour
FAMILIES = {"default": "the default", "no nested dropout": "nested dropout", "uniform nested dropout": "nested dropout",
            "linear nested dropout": "nested dropout", "no leakage guard": "leakage guard",
            "stop-gradient": "leakage guard", "cross-modal reconstruction": "leakage guard",
            "decorrelation": "leakage guard", "token bottleneck": "token format", "FSQ tokens": "token format",
            **{f"{design} design": "design line" for design in ("flextok", "fluxtalk", "adapter")}}


def family(variant: str) -> str:
    """A variant's family (FAMILIES); the FSQ shared-token variants are one, and a variant of your own is "other"."""
    return FAMILIES.get(variant, "FSQ shared tokens" if variant.startswith("FSQ shared tokens") else "other")


LEAKAGE_VARIANTS = ("no leakage guard", "stop-gradient", "cross-modal reconstruction", "decorrelation", "token bottleneck",
                    "FSQ tokens", "FSQ shared tokens")
SEEDS = (0, 1, 2)
PROBE = "non-linear"
REFERENCE = Path(__file__).resolve().parent / "docs" / "study"  # reference results: summaries of seed-0 runs
REFERENCE_TESTBED = "synthtouch-v4"  # the SynthTouch its runs were trained on (synthtouch.SynthTouch.VERSION then)
# config keys the reference's runs were trained with that today's variants set otherwise: the reference is of an
# older default, which also measured its preservation loss from the learned feature centres (no config key)
REFERENCE_CONFIG = {"model.decoder_readout": 0, "model.decoder_readout_solved": False, "model.encoder_readin": 0,
                    "model.encoder_readin_shared": 0, "model.encoder_readin_shared_nested": False,
                    "model.nested_dropout_per_pair": False, **EVERY_DIRECTION}
# What the reference keeps of a run is what the notebooks read of it, so that docs/ stays small (9.1 MB when it kept
# every seed's every table and training row; 2 MB at most now, a test checks): seed 0's config, evaluation and epoch
# rows (training minutes); the information map of the variants notebook 03 draws one of; confusion.csv where a run
# has it (it came after most reference runs were trained, and no weights are kept to compute it from; the run
# notebook 03 reads it from has it, a test checks). The leakage tables stay in your runs: runs.csv holds every
# seed's headline numbers, taken from them when --reference writes it.
REFERENCE_SEED = 0
REFERENCE_FILES = ("config.yaml", "eval.json", "metrics.jsonl")
LATER_REFERENCE_FILES = ("confusion.csv",)
# information.csv: notebook 03 draws the maps of these (the default's: when you have not trained it, and in tests)
MAPPED_VARIANTS = ("default", "no leakage guard", "FSQ shared tokens")


def run_config(variant: str, seed: int, root: str | os.PathLike = "runs/study", **overrides) -> phase1.TrainConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown study variant {variant!r}; choose from {list(VARIANTS)}")
    folder = Path(root) / variant.replace(" ", "-").replace(":", "") / f"seed-{seed}"
    return phase1.load_config(None, **{**VARIANTS[variant], "seed": seed, "output_dir": str(folder), **overrides})


def finished_run(variant: str, seed: int = 0, root: str | os.PathLike = "runs/study", needs=()) -> Path:
    """The folder of a finished study run: yours in `root` when you trained it (`make study`), otherwise its
    reference results in docs/study (tables only: `evaluate.read_eval`, `read_information`, `headline` and
    `train.training_minutes` read them; `phase1.load_aligner` needs weights, which only your own runs have).
    `needs`: files the folder must also hold (confusion.csv: runs evaluated before it came lack it)."""
    for folder in (run_config(variant, seed, root).run_dir, run_config(variant, seed, REFERENCE).run_dir):
        if all((folder / name).is_file() for name in ("eval.json", *needs)):
            return folder
    raise FileNotFoundError(f"no finished run of study variant {variant!r}, seed {seed}, in {root} or in "
                            f"{REFERENCE}; train it with: python study.py --variants '{variant}' --seeds {seed}")


def results_of(run: str | os.PathLike) -> str:
    """Whose results a finished run folder holds: "reference" (docs/study) or "yours"."""
    return "reference" if Path(run).resolve().is_relative_to(REFERENCE) else "yours"


def label(name: str, run: str | os.PathLike) -> str:
    """`name` as a figure's legend or a table shows it: marked when the run's results are the reference's."""
    return f"{name} (reference)" if results_of(run) == "reference" else name


def labelled(runs: dict) -> dict:
    """name -> run folder, each name as `label` gives it."""
    return {label(name, run): run for name, run in runs.items()}


def testbed_of(run: str | os.PathLike) -> str:
    """The SynthTouch version a finished run was trained on: the reference's, or today's for your own runs."""
    return REFERENCE_TESTBED if results_of(run) == "reference" else evaluate.SynthTouch.VERSION


def save_reference(rows: pd.DataFrame) -> None:
    """Write what the notebooks read of the finished runs of `rows` (runs.csv's rows) of seed REFERENCE_SEED into
    the reference folder: REFERENCE_FILES with only the epoch rows of metrics.jsonl, LATER_REFERENCE_FILES where a
    run has them, information.csv for MAPPED_VARIANTS."""
    for variant, seed, run in zip(rows.variant, rows.seed, map(Path, rows.run)):
        probed = ("leakage.csv", "information.csv")  # runs.csv's headline numbers and the maps come from them
        missing = [name for name in REFERENCE_FILES + probed if not (run / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{run} has no {', '.join(missing)}: the reference holds what the notebooks read "
                                    "of a run, the leakage probes' numbers included; train it with leakage_probes: true")
        if seed != REFERENCE_SEED:
            continue
        target = REFERENCE / run.parent.name / run.name
        target.mkdir(parents=True, exist_ok=True)
        names = [*REFERENCE_FILES, *(name for name in LATER_REFERENCE_FILES if (run / name).is_file()),
                 *(("information.csv",) if variant in MAPPED_VARIANTS else ())]
        for name in names:
            shutil.copyfile(run / name, target / name)
        epochs = [line for line in (run / "metrics.jsonl").read_text().splitlines(keepends=True)
                  if json.loads(line)["kind"] == "epoch"]
        (target / "metrics.jsonl").write_text("".join(epochs))


def headline(run_dir: str | os.PathLike) -> dict:
    """The headline numbers (docs/study/study.md), from a run's eval.json and leakage.csv (test split). Rows say k=n_shared
    (the complete shared embedding) and k=all (every register), so variants with other register counts line
    up; a number a design does not have (no preservation decoder, one adapter embedding) or a run did not
    measure (trained with `leakage_probes: false`: no leakage.csv) is NaN."""
    run_dir = Path(run_dir)
    cfg = phase1.run_config(run_dir)
    table = evaluate.read_eval(run_dir / "eval.json")
    R = table.index.max()  # the adapter has one embedding, whatever its config's register counts say
    S = min(cfg.model.n_shared, R)

    def cell(k, column):
        return table.at[k, column] if column in table else float("nan")

    out = {"n_shared": S, "n_registers": R, "R@1 pair, k=1": cell(1, "vision->touch R@1 pair"),
           "R@1 pair, k=n_shared": cell(S, "vision->touch R@1 pair"),
           "R@1 factor, k=n_shared": cell(S, "vision->touch R@1 factor")}
    for m in cfg.model.modalities:
        out[f"{m} recon cos, k=1"] = cell(1, f"{m} recon cos")
        out[f"{m} recon cos, k=all"] = cell(R, f"{m} recon cos")
        for measure in ("leak into shared embedding (max)", "leak into shared tokens (max)",
                        "shared factors from shared embedding (mean)", "fine shared from shared embedding (mean)"):
            out[f"{m} {measure}, k=n_shared"] = cell(S, f"{m} {measure} [{PROBE}]")
        out[f"{m} own private from private tokens (mean), k=all"] = \
            cell(R, f"{m} own private from private tokens (mean) [{PROBE}]")
    probed = (run_dir / "leakage.csv").is_file()
    leaks = pd.read_csv(run_dir / "leakage.csv") if probed else pd.DataFrame(
        columns=["probe", "source", "role", "k", "modality", "factor", "score", "normalised"])
    private = leaks[(leaks.probe == PROBE) & (leaks.source == "private tokens") & (leaks.role == "own private")
                    & (leaks.k == R)]
    for m in cfg.model.modalities:
        coarse = private[(private.modality == m) & (private.factor.map(evaluate.SynthTouch.SCALE) == "coarse")]
        out[f"{m} own private accuracy from private tokens (min), k=all"] = coarse.score.min()
    shared = leaks[(leaks.probe == PROBE) & (leaks.source == "shared tokens") & (leaks.role == "shared") & (leaks.k == S)
                   & leaks.factor.isin(retrieval.shared_discrete_factors())]
    for m in cfg.model.modalities:
        out[f"{m} coarse shared factors from shared tokens (min), k=n_shared"] = shared[shared.modality == m].normalised.min()
    return out


def _train(cfg: phase1.TrainConfig) -> Path:
    torch.set_num_threads(1)  # several small runs side by side use the cores better than one run on all
    return train.ensure_trained(cfg)


def study(variants=tuple(VARIANTS), seeds=SEEDS, root: str | os.PathLike = "runs/study", jobs: int = 1,
          **overrides) -> pd.DataFrame:
    """Train what is missing, then one row of `headline` numbers per (variant, seed)."""
    configs = {(v, s): run_config(v, s, root, **overrides) for v in variants for s in seeds}
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {key: pool.submit(_train, cfg) for key, cfg in configs.items()}
            runs = {key: f.result() for key, f in tqdm(futures.items(), desc="study runs")}
    else:
        runs = {key: train.ensure_trained(cfg) for key, cfg in tqdm(configs.items(), desc="study runs")}
    rows = [{"variant": v, "seed": s, **headline(run)} for (v, s), run in runs.items()]
    return pd.DataFrame(rows).assign(run=[str(run) for run in runs.values()])


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (over seeds, sample std) of every number at 3 significant digits, one column per variant,
    variants in study order."""
    numbers = rows.drop(columns=["seed", "run", "source"], errors="ignore").groupby("variant", sort=False)
    mean, std, n = numbers.mean(), numbers.std(ddof=1), numbers.size()
    spread = std.map(lambda x: "" if pd.isna(x) else f" ± {plots.significant(x, tiny_is_zero=False)}")  # one seed: none
    table = mean.map(plots.significant) + spread  # –: the design has no such number
    return table.assign(seeds=n).T


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    """`summarise` for a notebook: one row per variant, under its family (families in the order they first come)."""
    table = summarise(rows).T
    families = table.index.map(family)
    order = np.argsort(pd.Index(families).map(list(dict.fromkeys(families)).index), kind="stable")
    table.index = pd.MultiIndex.from_arrays([families, table.index], names=["family", "variant"])
    return table.iloc[order]


# summary_table's two dozen columns scroll past a notebook's output area; split by what they measure, each part has
# at most four "mean ± std" columns beside the designs' names and fits it (tests/test_browser.py measures it): a
# title, then each column's short header and its name in `headline`, less the modality, which heads the columns of a
# number each modality has
SUMMARY_PARTS = {
    "Registers and vision→touch retrieval": {
        "shared tokens": "n_shared", "registers": "n_registers", "seeds": "seeds", "R@1 pair, k=1": "R@1 pair, k=1",
        "R@1 pair, k=n_shared": "R@1 pair, k=n_shared", "R@1 factor, k=n_shared": "R@1 factor, k=n_shared"},
    "Preservation cosine: each modality's frozen features from its own tokens": {
        "k=1": "recon cos, k=1", "k=all": "recon cos, k=all"},
    "Own private factors in the shared part, k=n_shared (worst factor; 0 chance, 1 perfect)": {
        "shared embedding": "leak into shared embedding (max), k=n_shared",
        "shared tokens": "leak into shared tokens (max), k=n_shared"},
    "Shared factors from the shared embedding, k=n_shared (mean; 0 chance, 1 perfect)": {
        "all": "shared factors from shared embedding (mean), k=n_shared",
        "fine": "fine shared from shared embedding (mean), k=n_shared"},
    "Coarse shared factors from the shared tokens, k=n_shared (worst factor; 0 chance, 1 perfect)": {
        "": "coarse shared factors from shared tokens (min), k=n_shared"},
    "Own private factors from the private tokens, k=all": {
        "score (mean; 0 chance, 1 perfect)": "own private from private tokens (mean), k=all",
        "probe accuracy (worst coarse factor)": "own private accuracy from private tokens (min), k=all"},
}


def summary_parts(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """`summary_table` as SUMMARY_PARTS: title -> the part's table, variants under their families as there."""
    table = summary_table(rows)
    parts = {}
    for title, headers in SUMMARY_PARTS.items():
        per_modality = {(m, header): f"{m} {name}" for m in encoders.MODALITIES for header, name in headers.items()
                        if f"{m} {name}" in table}
        if per_modality:
            parts[title] = table[list(per_modality.values())].set_axis(pd.MultiIndex.from_tuples(per_modality), axis=1)
        else:
            parts[title] = table[list(headers.values())].set_axis(list(headers), axis=1)
    # "mean ± std" held together by no-break spaces: a narrow table wraps a header or a name, never a number
    return {title: part.map(lambda cell: str(cell).replace(" ± ", "\u00a0±\u00a0")) for title, part in parts.items()}


def targets(run_dir: str | os.PathLike) -> dict:
    """What a run reaches of the workbook's coarse-to-fine claims, from its eval.json, information.csv and
    leakage.csv (test split): the preservation cosine's rise from k = 1 to all tokens and its worst gap to the
    ridge read-out of the same tokens, each fine factor a modality sees read from all its tokens and the gain over
    its shared tokens, the rise of exact-pair R@1 from k = 1 to n_shared in standard errors of the difference,
    the worst own-private leakage, private factors from private tokens and factor-level R@1."""
    run_dir = Path(run_dir)
    cfg, table = phase1.run_config(run_dir), evaluate.read_eval(run_dir / "eval.json")
    R, numbers = table.index.max(), headline(run_dir)
    S, out = numbers["n_shared"], {}
    for m in cfg.model.modalities:
        if f"{m} recon cos" in table:
            out[f"{m} recon cos rise, k=1 to all"] = table.at[R, f"{m} recon cos"] - table.at[1, f"{m} recon cos"]
        if f"{m} readout cos" in table:
            out[f"{m} decoder minus ridge read-out, worst k"] = (table[f"{m} recon cos"] - table[f"{m} readout cos"]).min()
    info = evaluate.read_information(run_dir).set_index(["modality", "source", "factor"]).score
    for m in cfg.model.modalities:
        for name, group in evaluate.SynthTouch.factor_groups.items():
            if evaluate.SynthTouch.SCALE[name] == "fine" and group in ("shared", m) and (m, "all", name) in info:
                out[f"{m} {name} from all tokens"] = info[(m, "all", name)]
                out[f"{m} {name} gain over the shared tokens"] = info[(m, "all", name)] - info[(m, "shared", name)]
    n = round(1 / table.at[1, "chance@1 pair"])  # queries: chance of exact-pair R@1 is one in n
    p1, pS = table.at[1, "vision->touch R@1 pair"], table.at[S, "vision->touch R@1 pair"]
    out["vision->touch R@1 pair rise, k=1 to n_shared, in standard errors"] = \
        (pS - p1) / np.sqrt((p1 * (1 - p1) + pS * (1 - pS)) / n)
    out[LEAK] = max(numbers[f"{m} leak into shared embedding (max), k=n_shared"] for m in cfg.model.modalities)
    for m in cfg.model.modalities:
        out[f"{m} own private accuracy from private tokens (min), k=all"] = \
            numbers[f"{m} own private accuracy from private tokens (min), k=all"]
    out[RETRIEVAL] = numbers[RETRIEVAL]
    return out


LEAK = "worst own-private leakage into the shared embedding, k=n_shared"
RETRIEVAL = "R@1 factor, k=n_shared"
# the workbook's target corner: a design that keeps its own private factors out of the shared embedding (leakage at
# most this) and still retrieves the right shared factors (R@1 at least this)
TARGET = {LEAK: 0.15, RETRIEVAL: 0.9}
# what notebook 03's study figure shows of every design: retrieval, leakage and the touch preservation cosine
FIGURE_COLUMNS = (RETRIEVAL, "R@1 pair, k=n_shared", LEAK, "touch recon cos, k=all")


def read_rows(root: str | os.PathLike = "runs/study") -> pd.DataFrame:
    """One row per run (runs.csv): your study's runs for the variants you have trained, the reference results'
    for the others, as `finished_run` chooses folders; `source` says which ("yours" or "reference")."""
    reference = pd.read_csv(REFERENCE / "runs.csv").assign(source="reference")
    if not (Path(root) / "runs.csv").is_file():
        return reference
    mine = pd.read_csv(Path(root) / "runs.csv").assign(source="yours")
    return pd.concat([mine, reference[~reference.variant.isin(mine.variant)]], ignore_index=True)


def merge_rows(new: pd.DataFrame, old_csv: Path) -> pd.DataFrame:
    """The rows of a study folder's runs.csv (`old_csv`, if there is one) with `new` in place of those of the same
    (variant, seed), in study order: a study of some variants or seeds adds to the table, never shrinks it."""
    if not old_csv.is_file():
        return new
    old = pd.read_csv(old_csv)
    kept = old[~old.set_index(["variant", "seed"]).index.isin(new.set_index(["variant", "seed"]).index)]
    rows = pd.concat([kept, new], ignore_index=True)
    order = {v: i for i, v in enumerate(VARIANTS)}
    return rows.sort_values(["variant", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c,
                            kind="stable", ignore_index=True)


def per_variant(rows: pd.DataFrame, columns=FIGURE_COLUMNS) -> pd.DataFrame:
    """Per variant (in study order), mean and std ("<column> std") over seeds of `columns` of the runs' rows, the
    number of seeds, and where `rows` says (read_rows), whose results they are. LEAK, the worst own-private
    leakage into the aligned shared embedding, is the larger of the modalities' worst factors of each run."""
    leak_columns = [c for c in rows.columns if c.endswith("leak into shared embedding (max), k=n_shared")]
    per_run = rows.assign(**{LEAK: rows[leak_columns].max(axis=1, skipna=False)})
    grouped = per_run.groupby("variant", sort=False)[list(columns)]
    table = grouped.mean().join(grouped.std(ddof=1), rsuffix=" std").assign(seeds=grouped.size())
    if "source" in per_run:  # read_rows: a variant's runs are all yours or all the reference's
        table["source"] = per_run.groupby("variant", sort=False)["source"].first()
    return table.reindex([v for v in VARIANTS if v in table.index])


def tradeoff(rows: pd.DataFrame) -> pd.DataFrame:
    """What each variant pays for keeping private factors out (`per_variant` of LEAK and of factor-level
    vision→touch R@1, both at k = n_shared). Variants without a leakage number (the adapter has no private tokens
    to keep apart) are left out."""
    return per_variant(rows.dropna(subset=[RETRIEVAL]), (LEAK, RETRIEVAL)).dropna(subset=[LEAK, RETRIEVAL])


def distance_to_target(table: pd.DataFrame) -> pd.Series:
    """How far each design's mean point of the `tradeoff` table lies from the target corner (0 inside it): the
    leakage above its bound and the R@1 below its bound, as one Euclidean distance."""
    over = (table[LEAK] - TARGET[LEAK]).clip(lower=0)
    under = (TARGET[RETRIEVAL] - table[RETRIEVAL]).clip(lower=0)
    return np.hypot(over, under)


def closest_to_target(table: pd.DataFrame) -> str:
    """The design of the `tradeoff` table nearest the target corner; among designs inside it, the one retrieving
    most."""
    return table.assign(distance=distance_to_target(table)).sort_values(
        ["distance", RETRIEVAL], ascending=[True, False]).index[0]


def _mean_std(row: pd.Series, column: str) -> str:
    """`mean ± std` at 3 decimals, the mean alone where one seed has no spread."""
    std = row.get(f"{column} std")
    return f"{row[column]:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}")


def tradeoff_summary(table: pd.DataFrame) -> str:
    """The trade-off figure in words (Markdown), every number from `table`: which designs keep leakage within the
    target, the one of them that retrieves most, and which design is inside or closest to the target corner."""
    def point(name):
        row = table.loc[name]
        seeds = f"{int(row['seeds'])} seed{'s' if row['seeds'] > 1 else ''}"
        return (f"**{name}** (R@1 {_mean_std(row, RETRIEVAL)}, leakage {_mean_std(row, LEAK)}, {seeds}"
                f"{', reference results' if row.get('source') == 'reference' else ''})")

    low = table[table[LEAK] <= TARGET[LEAK]]
    inside = low[low[RETRIEVAL] >= TARGET[RETRIEVAL]]
    lines = [f"- Leakage within {TARGET[LEAK]}: " + (", ".join(low.index) if len(low) else "no design") + "."]
    if len(low):
        lines.append(f"- Of these, the most factor-level R@1: {point(low[RETRIEVAL].idxmax())}; the best R@1 of all "
                     f"designs: {point(table[RETRIEVAL].idxmax())}.")
    lines.append(f"- Inside the target corner: {', '.join(map(point, inside.index))}." if len(inside) else
                 f"- No design is inside the target corner; the closest: {point(closest_to_target(table))}.")
    return "\n".join(lines)


def write(rows: pd.DataFrame, root: str | os.PathLike = "runs/study") -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows.to_csv(root / "runs.csv", index=False)
    (root / "study.md").write_text(markdown(summarise(rows)))
    return root / "study.md"


def markdown(table: pd.DataFrame) -> str:
    lines = ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def curves(variants=("default", "no nested dropout"), seed: int = 0, root: str | os.PathLike = "runs/study"):
    """Quality against k of finished study runs (one seed): the figure at the top of the README."""
    runs = labelled({v: finished_run(v, seed, root) for v in variants})
    tables = {name: evaluate.read_eval(run / "eval.json") for name, run in runs.items()}
    chance = {"vision->touch R@1 pair": "chance@1 pair", "vision->touch R@1 factor": "chance@1 factor"}
    return plots_prefix.prefix_curves(tables, [*chance, "vision recon cos", "touch recon cos"],
                                      f"Quality vs prefix length k (test split, seed {seed})", chance)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", default="runs/study", help="study folder (default: runs/study)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, one thread each")
    parser.add_argument("--figure", help="only draw quality vs k of default and 'no nested dropout' (seed 0), to this PNG")
    parser.add_argument("--reference", action="store_true",
                        help="also copy the finished runs' tables into docs/study, the reference results that "
                             "notebooks fall back on")
    parser.add_argument("--targets", nargs="+", metavar="RUN",
                        help="only measure these finished run folders against the coarse-to-fine targets (`targets`), "
                             "mean ± std over them, into OUT/targets.md")
    args = parser.parse_args(argv)
    if args.targets:
        rows = pd.DataFrame([{"variant": "runs", "seed": i, "run": run, **targets(run)}
                             for i, run in enumerate(args.targets)])
        path = Path(args.out) / "targets.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(summarise(rows)) + "\n")
        print(path.read_text())
        return
    if args.figure:
        Path(args.figure).write_bytes(plots.png(curves(root=args.out)))
        return
    rows = study(args.variants, args.seeds, args.out, args.jobs)
    print(Path(write(merge_rows(rows, Path(args.out) / "runs.csv"), args.out)).read_text())
    if args.reference:  # the runs' tables, and their rows in docs/study/runs.csv and study.md
        save_reference(rows)
        write(merge_rows(rows, REFERENCE / "runs.csv"), REFERENCE)


if __name__ == "__main__":
    main()
