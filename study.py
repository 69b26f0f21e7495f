"""The statistics behind the headline numbers: the default model and its variants, each trained with several
seeds on SynthTouch and measured on the test split, reported as mean ± std.

    python study.py                                       # every variant × seeds 0 1 2 -> runs/study/
    python study.py --variants default "no nested dropout" --seeds 0 1 2 --jobs 2

Each (variant, seed) is an ordinary phase-1 run folder (runs/study/<variant>/seed-<s>), trained by
train.ensure_trained, so an interrupted study continues where it stopped and a finished run is never
trained twice. Epochs and weights were chosen on the validation split; the test split is only read here.
Writes runs/study/runs.csv (one row per run) and runs/study/study.md (mean ± std per variant).
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

import evaluate
import phase1
import plots
import train

# name -> overrides of configs/default.yaml. The default carries the leakage design the workbook adopted;
# the guards below replace it, each alone, so they are compared on the same data, features and budget.
VARIANTS = {
    "default": {},
    "no nested dropout": {"model.nested_dropout": "none"},
    "no leakage guard": {"model.leakage_guard": "none", "model.alignment_weight": 0.0},
    "stop-gradient": {"model.leakage_guard": "stopgrad", "model.alignment_weight": 0.0},
    "cross-modal reconstruction": {"model.leakage_guard": "cross", "model.alignment_weight": 0.0},
    "decorrelation": {"model.leakage_guard": "decorrelate", "model.alignment_weight": 0.0},
    "token bottleneck": {"model.token_dim": 8},  # the default with 8 numbers per token: less leaks, less retrieved
}
LEAKAGE_VARIANTS = ("no leakage guard", "stop-gradient", "cross-modal reconstruction", "decorrelation", "token bottleneck")
SEEDS = (0, 1, 2)
PROBE = "non-linear"


def run_config(variant: str, seed: int, root: str | os.PathLike = "runs/study", **overrides) -> phase1.TrainConfig:
    if variant not in VARIANTS:
        raise ValueError(f"unknown study variant {variant!r}; choose from {list(VARIANTS)}")
    folder = Path(root) / variant.replace(" ", "-").replace(":", "") / f"seed-{seed}"
    return phase1.load_config(None, **{**VARIANTS[variant], "seed": seed, "output_dir": str(folder), **overrides})


def headline(run_dir: str | os.PathLike) -> dict:
    """The numbers the README quotes, from a run's eval.json and leakage.csv (test split)."""
    run_dir = Path(run_dir)
    cfg = phase1.load_config(run_dir / "config.yaml")
    table = evaluate.read_eval(run_dir / "eval.json")
    S, R = cfg.model.n_shared, cfg.model.n_registers
    out = {"R@1 pair, k=1": table.loc[1, "vision->touch R@1 pair"],
           f"R@1 pair, k={S}": table.loc[S, "vision->touch R@1 pair"],
           f"R@1 factor, k={S}": table.loc[S, "vision->touch R@1 factor"]}
    for m in cfg.model.modalities:
        out[f"{m} recon cos, k=1"] = table.loc[1, f"{m} recon cos"]
        out[f"{m} recon cos, k={R}"] = table.loc[R, f"{m} recon cos"]
        for measure in ("leak into shared embedding (max)", "leak into shared tokens (max)",
                        "shared factors from shared embedding (mean)", "fine shared from shared embedding (mean)"):
            out[f"{m} {measure}, k={S}"] = table.loc[S, f"{m} {measure} [{PROBE}]"]
        out[f"{m} own private from private tokens (mean), k={R}"] = \
            table.loc[R, f"{m} own private from private tokens (mean) [{PROBE}]"]
    leaks = pd.read_csv(run_dir / "leakage.csv")
    private = leaks[(leaks.probe == PROBE) & (leaks.source == "private tokens") & (leaks.role == "own private")
                    & (leaks.k == R)]
    for m, part in private.groupby("modality"):
        coarse = part[part.factor.map(evaluate.SynthTouch.SCALE) == "coarse"]
        out[f"{m} own private accuracy from private tokens (min), k={R}"] = coarse.score.min()
    shared = leaks[(leaks.probe == PROBE) & (leaks.source == "shared tokens") & (leaks.role == "shared") & (leaks.k == S)
                   & leaks.factor.isin(evaluate.shared_discrete_factors())]
    for m, part in shared.groupby("modality"):
        out[f"{m} coarse shared factors from shared tokens (min), k={S}"] = part.normalised.min()
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
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """mean ± std (over seeds, sample std) of every number, one row per variant, variants in study order."""
    numbers = rows.drop(columns="seed").groupby("variant", sort=False)
    mean, std, n = numbers.mean(), numbers.std(ddof=1), numbers.size()
    spread = std.round(3).map(lambda x: "" if pd.isna(x) else f" ± {x}")  # one seed has no spread
    table = mean.round(3).map(str) + spread
    return table.assign(seeds=n).T


def write(rows: pd.DataFrame, root: str | os.PathLike = "runs/study") -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows.to_csv(root / "runs.csv", index=False)
    table = summarise(rows)
    lines = ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in table.iterrows()]
    (root / "study.md").write_text("\n".join(lines) + "\n")
    return root / "study.md"


def curves(variants=("default", "no nested dropout"), seed: int = 0, root: str | os.PathLike = "runs/study"):
    """Quality against k of finished study runs (one seed): the figure at the top of the README."""
    tables = {v: evaluate.read_eval(run_config(v, seed, root).run_dir / "eval.json") for v in variants}
    chance = {"vision->touch R@1 pair": "chance@1 pair", "vision->touch R@1 factor": "chance@1 factor"}
    return plots.prefix_curves(tables, [*chance, "vision recon cos", "touch recon cos"],
                               f"Quality vs prefix length k (test split, seed {seed})", chance)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", default="runs/study", help="study folder (default: runs/study)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, one thread each")
    parser.add_argument("--figure", help="only draw quality vs k of default and 'no nested dropout' (seed 0), to this PNG")
    args = parser.parse_args(argv)
    if args.figure:
        Path(args.figure).write_bytes(plots.png(curves(root=args.out)))
        return
    rows = study(args.variants, args.seeds, args.out, args.jobs)
    print(Path(write(rows, args.out)).read_text())


if __name__ == "__main__":
    main()
