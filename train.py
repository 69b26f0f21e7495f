"""Phase 1: train register-token alignment on cached frozen features.

    python train.py                                   # configs/default.yaml: SynthTouch on a CPU
    python train.py --config configs/fluxtalk.yaml --epochs 5 --output_dir runs/fluxtalk
    torchrun --nproc_per_node=4 train.py --config configs/flextok.yaml --datasets_dir /data/tvl

One config dataclass (phase1.TrainConfig: YAML + flags; phase1.py also builds the run's data, encoders and
model), trained by the one loop of loop.py (AdamW, warm-up + cosine, bf16
autocast on GPU), which owns the run folder: config.yaml, checkpoint/ (model.safetensors + state.pt),
metrics.jsonl, and at the end eval.json.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import designs
import evaluate
import information
import layouts
import loop
import prefixes
from config import Flag, HelpFormatter, add_config_flags, config_overrides, shipped_or_given
from phase1 import (DEFAULT_CONFIG, RESUME_IGNORES, ROOT, TrainConfig, design_overrides, load_config, prepared,
                    run_folder, to_yaml)
from readout_fit import solve_readouts
from seed_api import train_alignment  # the seed API's name, re-exported: the README's quick start imports it from here


# ----------------------------------------------------------------------------------------------
# Training: phase 1 through the one loop (loop.fit), which starts and writes the run folder

def train(cfg: TrainConfig, resume: bool = False, callback=None, overwrite: bool = False, threads=None) -> Path:
    """Train phase 1 and return the run folder. `callback(row)` sees every metrics row (live plots); `threads()`
    says how many threads each step computes on (loop.fit; None: torch's count as it is).

    Ctrl-C saves a checkpoint before stopping; a non-finite loss, gradient or parameter stops with the
    last good checkpoint kept. A folder that already holds a run needs `resume` or `overwrite`.
    """
    with prepared(cfg, resume, overwrite) as job:  # one trainer per run folder (loop.RunFolder.opened)
        model, dist, run_dir = job.model, job.dist, job.run.folder.path
        (train_set, train_feats), (val_set, val_feats), (test_set, test_feats) = job.splits.values()
        ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model

        def load(index):  # runs in fit's reading thread, ahead of the step
            return {m: f.batch(index, job.device) for m, f in train_feats.items()}

        def loss_fn(batch):
            with job.autocast:
                return ddp(batch)

        def epoch_end(epoch):
            solve = cfg.model.decoder_readout_solved and hasattr(model, "decoders")  # no decoder: nothing to solve
            if epoch == cfg.epochs - 1 and dist.main and (solve or cfg.model.shared_agreement):
                # after the last step, before its checkpoint, so the run's weights hold what is fit here. The register
                # module runs once over the training and validation pairs for both fits: neither changes it
                def registers(feats):
                    return {m: e.tokens for m, e in prefixes.encode_all(model, feats, [], reconstruct=False).items()}
                held_out = val_feats if val_feats is not None else train_feats
                tokens = {"fit": registers(train_feats)}
                tokens["select"] = registers(val_feats) if val_feats is not None else tokens["fit"]  # encoded once
                if solve:
                    solve_readouts(model, train_feats, held_out, tokens)
                if cfg.model.shared_agreement:
                    fit_agreed_subspace(model, tokens["fit"], tokens["select"] if val_feats is not None else None)
            return quick_eval(model, val_feats, val_set) if val_feats is not None and dist.main else {}

        # the bar names the run by its last two folders: phase1/default, or a study's default/seed-0
        loop.fit(model, loss_fn, job.batches, job.steps_per_epoch, cfg, job.run, epoch_end=epoch_end, callback=callback,
                 desc=f"phase 1: {run_dir.parent.name}/{run_dir.name}", rank=dist.rank, load=load, threads=threads)
        if dist.main:
            probe_splits = dict(fit=(train_feats, train_set), select=(val_feats, val_set)) if cfg.leakage_probes else None
            evaluate_run(model, test_feats, test_set, run_dir / "eval.json", probe_splits, threads)
        if dist.world > 1:
            torch.distributed.destroy_process_group()
        return run_dir


def ensure_trained(cfg: TrainConfig, callback=None, evaluated: bool = True, threads=None) -> Path:
    """The run folder of `cfg`, training only what is missing: a finished run (eval.json) of the same config
    is reused, an interrupted one resumes, otherwise training starts. Re-running a notebook costs nothing.
    A folder holding a run of another config (epochs included) is refused, as on the command line.

    One process trains a folder at a time; another asking for it waits, then reuses the run. With
    `evaluated=False` it returns as soon as the weights are final, without waiting for the test-split
    evaluation: what notebook 04 needs, so `make demo` starts it beside notebook 02's evaluation."""
    run = run_folder(cfg.run_dir)

    def final() -> bool:
        return not evaluated and run.trained(cfg.epochs)  # trained() needs the checkpoint of the last epoch

    with run.exclusive(ready=final):  # held, or another process holds it and the weights are final
        if run.checkpoint is None:
            return train(cfg, callback=callback, threads=threads)
        run.check_same_config(to_yaml(cfg, cfg.run_dir), RESUME_IGNORES)
        if (cfg.run_dir / "eval.json").is_file() or final():
            return cfg.run_dir
        return train(cfg, resume=True, callback=callback, threads=threads)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl: {"kind": "step" | "epoch", ...}."""
    return loop.RunFolder(run_dir).rows()


def training_minutes(run_dir: str | os.PathLike) -> float:
    """Wall-clock training time of a run, summed over its epochs (a resumed run counts each epoch once)."""
    return sum(row["seconds"] for row in read_metrics(run_dir) if row["kind"] == "epoch") / 60

def factor_codes(dataset) -> dict | None:
    return dataset.factor_table() if hasattr(dataset, "factor_table") else None


@torch.no_grad()
def fit_agreed_subspace(model, train_tokens, val_tokens=None) -> np.ndarray:
    """Fit the model's agreed subspace (agreement.py) on the training pairs' unit shared embeddings at k = n_shared,
    its cross-predictions' settings chosen on the validation pairs (None: on training pairs held out of their fit).
    `*_tokens`: modality → N×R×hidden register outputs (`prefixes.encode_all(...)[m].tokens`). Returns every
    direction's correlation between the modalities."""
    model.agreed.reset()  # embed as training made it, however often it is fit
    device, was_training = next(model.parameters()).device, model.training
    model.eval()

    def unit_embeddings(tokens):  # every shared token kept: the embedding at k = n_shared
        return {m: model.shared_embedding(m, t.to(device)).double().cpu().numpy() for m, t in tokens.items()}
    try:
        return model.agreed.fit(unit_embeddings(train_tokens), model.cfg.shared_agreement,
                                unit_embeddings(val_tokens) if val_tokens is not None else None)
    finally:
        model.train(was_training)


def quick_eval(model, feats, dataset) -> dict:
    """Validation retrieval at k = n_shared (all k come in eval.json at the end)."""
    k = model.design.shared_k
    encoded = prefixes.encode_all(model, feats, [k], reconstruct=False)  # retrieval only: no preservation decoder
    table = evaluate.evaluate_prefixes(model, feats, factor_codes(dataset), ks=[k], encoded=encoded)
    return {f"val {name}": float(value) for name, value in table.iloc[0].items() if "R@1" in name}


def evaluate_run(model, feats, dataset, out_path: Path, probe_splits: dict | None = None, threads=None):
    """evaluate.evaluate_run on a split; `probe_splits`: {"fit": (features, dataset), "select": (...)}, the probes'
    training rows (a fixed subset of information.fit_rows) and the rows their regularisation is chosen on. TVL-layout
    data also gets TVL's own touch–vision number (retrieval.tvl_top1)."""
    splits = None
    if probe_splits is not None and all(dataset is not None for _, dataset in probe_splits.values()):
        splits = {}
        for split, (features, split_set) in probe_splits.items():
            rows = information.fit_rows(len(split_set)) if split == "fit" else np.arange(len(split_set))
            table = factor_codes(split_set)
            splits[split] = ({m: f.batch(rows) for m, f in features.items()},
                             {name: np.asarray(v)[rows] for name, v in table.items()} if table is not None else None)
    return evaluate.evaluate_run(model, feats, factor_codes(dataset), splits, out_path=out_path,
                                 tvl=isinstance(dataset, layouts.TVLDataset), threads=threads)


# ----------------------------------------------------------------------------------------------
# Command line: the seed flags override the YAML file

FLAGS = {
    "epochs": Flag("epochs", int, "passes over the training split"),
    "batch_size": Flag("batch_size", int, "samples per step (the global batch under torchrun)"),
    "lr": Flag("lr", float, "peak learning rate of AdamW (warm-up, then cosine decay)"),
    "seed": Flag("seed", int, "seed of the initial weights, the batch order and nested dropout"),
    "output_dir": Flag("output_dir", str, "the run folder (config.yaml, checkpoint/, metrics.jsonl, eval.json)"),
    "log_name": Flag("log_name", str, "a sub-folder of output_dir to write the run into, as in the TVL seed lines"),
    "n_registers": Flag("model.n_registers", int, "register tokens per modality"),
    "n_shared": Flag("model.n_shared", int, "the first n_shared registers are aligned across modalities"),
    "loss_type": Flag("model.loss_type", str, "combined adds a flow-matching head that transports one modality's "
                      "shared embedding to the other's", ("contrastive", "combined")),
    "flow_weight": Flag("model.flow_weight", float, "weight of the flow-matching loss (with --loss_type combined)"),
    # FluxTalk's names (seeds 002/003)
    "num_register_tokens": Flag("model.n_registers", int, "FluxTalk's name of --n_registers"),
    "num_overlapping_tokens": Flag("model.n_shared", int, "FluxTalk's name of --n_shared"),
    "nested_dropout_rate": Flag("model.nested_dropout_rate", float, "FluxTalk design: drop probability of the last "
                                "register under linear nested dropout"),
    "complementary_reg_weight": Flag("model.complementary_reg_weight", float, "FluxTalk design: weight of the L2 + "
                                     "diversity regularisation of the complementary (private) registers"),
}


@dataclass
class RunMode:
    resume: bool = False  # continue the run in output_dir
    overwrite: bool = False  # replace the run in output_dir


def parse_args(argv=None) -> tuple[TrainConfig, RunMode]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG.relative_to(ROOT),
                        help="YAML config: configs/default.yaml (SynthTouch on a CPU), or one per design line: "
                             f"{', '.join(f'configs/{d}.yaml' for d in designs.DESIGNS)}")
    parser.add_argument("--design", choices=tuple(designs.DESIGNS), help="put configs/<design>.yaml's design (register "
                        "counts, attention, nested dropout, losses) on the config, keeping its data, encoders and "
                        "width: --design fluxtalk trains FluxTalk's registers on SynthTouch")
    parser.add_argument("--stage1_checkpoint", help="TVL stage-1 checkpoint: its tactile encoder becomes the touch "
                        "encoder (config key encoders.touch)")
    parser.add_argument("--datasets_dir", help="TVL data folder (ssvtp/, hct/) or your own (train.csv with columns "
                        "among vision, touch, caption); without it the config's dataset (SynthTouch) is used")
    add_config_flags(parser, FLAGS, load_config(None), str(DEFAULT_CONFIG.relative_to(ROOT)))
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    args = parser.parse_args(argv)
    overrides = config_overrides(args, FLAGS)
    config = shipped_or_given(args.config)
    design = design_overrides(args.design, config) if args.design else {}
    cfg = load_config(config, **{**design, **overrides})
    refuse_what_would_be_ignored(cfg, args, overrides, config)
    if args.datasets_dir:  # the folder says which layout it is; a CSV's columns say which modalities it has
        cfg.dataset, cfg.datasets_dir = layouts.dataset_layout(args.datasets_dir), args.datasets_dir
        if cfg.dataset == "csv" and "model.modalities" not in overrides:
            cfg.model.modalities = layouts.csv_modalities(args.datasets_dir)
    if args.stage1_checkpoint:  # its own architecture, image size and normalisation come with it
        cfg.encoders["touch"] = {"name": "tvl-touch-vit-tiny", "weights": args.stage1_checkpoint}
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    return cfg, RunMode(args.resume, args.overwrite)


# keys that act only under some setting of the model: given where they would do nothing, they are refused
ACTS_ONLY_WITH = {"model.nested_dropout_rate": ("nested_dropout", "linear"),
                  "model.flow_weight": ("loss_type", "combined")}
FLUXTALK_FLAGS = ("nested_dropout_rate", "complementary_reg_weight")  # the flags of seeds 002/003


def refuse_what_would_be_ignored(cfg: TrainConfig, args: argparse.Namespace, overrides: dict, config: Path):
    """FluxTalk's flags with another design, or a key its design does not use, stop the run with what to add:
    a seed command line must train what it describes, never another model with its flags dropped."""
    flux = [f"--{flag}" for flag in FLUXTALK_FLAGS if hasattr(args, flag)]
    if flux and cfg.model.design != "fluxtalk":
        raise SystemExit(f"{' and '.join(flux)} {'are flags' if len(flux) > 1 else 'is a flag'} of the FluxTalk design "
                         f"(seeds 002/003), but {config} trains the {cfg.model.design} design with "
                         f"{cfg.model.nested_dropout} nested dropout, which would not train what they describe. Add "
                         "--config configs/fluxtalk.yaml (the seeds' setting: TVL data by --datasets_dir, ViT-L-14) or "
                         "--design fluxtalk (FluxTalk's registers on this config's data and encoders, e.g. SynthTouch)")
    for key, (field, value) in ACTS_ONLY_WITH.items():
        if key in overrides and getattr(cfg.model, field) != value:
            raise SystemExit(f"{key}={overrides[key]} does nothing with model.{field}: {getattr(cfg.model, field)} "
                             f"(from {config}); it acts only with model.{field}: {value}. Add --set "
                             f"model.{field}={value}, or drop it")


def eval_summary(path: Path) -> str:
    """eval.json's retrieval at every k, a row per direction and its chance level, and where the rest is."""
    table = evaluate.retrieval_columns(evaluate.read_eval(path))
    return (f"R@1 on the test split by number of tokens k:\n{table.T.to_string(float_format='%.3f')}\n"
            f"every metric at every k: {path}")


def main(argv=None):
    cfg, mode = parse_args(argv)
    run_dir = train(cfg, resume=mode.resume, overwrite=mode.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {run_dir}\n{eval_summary(run_dir / 'eval.json')}")


if __name__ == "__main__":
    main()
