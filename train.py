"""Phase 1: train register-token alignment on cached frozen features.

    python train.py                                   # configs/default.yaml: SynthTouch on a CPU
    python train.py --config configs/fluxtalk.yaml --epochs 5 --output_dir runs/fluxtalk
    torchrun --nproc_per_node=4 train.py --config configs/flextok.yaml --datasets_dir /data/tvl

One config dataclass (YAML + flags), trained by the one loop of loop.py (AdamW, warm-up + cosine, bf16
autocast on GPU), which owns the run folder: config.yaml, checkpoint/ (model.safetensors + state.pt),
metrics.jsonl, and at the end eval.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

import core
import data
import evaluate
import loop
from config import load_dataclass
from encoders import EncoderConfig, FrozenEncoder, create_encoder, resolve_encoder

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


@dataclass
class TrainConfig:
    # frozen encoders per modality: a name from encoders.ENCODERS, or {name: ..., weights: ..., ...overrides}
    encoders: dict = field(default_factory=lambda: {"vision": "synth-vision", "touch": "synth-touch",
                                                    "text": "minilm"})
    model: core.ModelConfig = field(default_factory=core.ModelConfig)
    # data: the SynthTouch testbed, the TVL layout under datasets_dir, or your own CSV files (dataset: csv)
    dataset: str = "synthtouch"
    datasets_dir: str | None = None
    skip_missing: bool = False  # real data: drop rows whose files are missing (counted in one warning)
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 1000
    image_size: int = 64
    data_seed: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    # >1: an epoch takes blocks of this many consecutive cached samples in a shuffled order (shuffled within
    # each block), so a feature cache larger than memory is read in long runs (e.g. 1024 for TVL at 257 tokens)
    shuffle_block: int = 1
    log_every: int = 10  # steps between loss rows in metrics.jsonl
    # evaluation: probe leakage (SynthTouch) for eval.json at the end, about a minute at the testbed's size
    leakage_probes: bool = True
    # output
    output_dir: str = "runs/phase1/default"
    log_name: str | None = None  # a sub-folder of output_dir, as in the TVL seed command lines
    cache_dir: str = "cache/features"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.log_name if self.log_name else Path(self.output_dir)

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test") if self.dataset == "synthtouch" else ():
            if getattr(self, name) < 1:
                default = TrainConfig.__dataclass_fields__[name].default
                raise ValueError(f"{name} must be at least 1 (the size of the SynthTouch {name[2:]} split), got "
                                 f"{getattr(self, name)}; e.g. {name}: {default}")
        loop.check_hyperparameters(self, "phase-1 config")
        if self.shuffle_block < 1:
            raise ValueError(f"shuffle_block must be at least 1 (1: a plain shuffle), got {self.shuffle_block}; "
                             "e.g. shuffle_block: 1024")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A YAML config (configs/default.yaml when None) with overrides; model fields as "model.<name>"."""
    return load_dataclass(TrainConfig, path or DEFAULT_CONFIG, overrides, nested="model")


# what a design line keeps when it moves to the testbed; data, encoders, width and optimisation come from default.yaml
DESIGN_KEYS = ("design", "n_registers", "n_shared", "attention", "nested_dropout", "nested_dropout_rate", "loss_type",
               "flow_weight", "preservation_weight", "complementary_reg_weight")


def design_on_testbed(design: str, **overrides) -> TrainConfig:
    """configs/<design>.yaml's design (register counts, attention, dropout, losses) at the testbed's data,
    encoders and width, so the three design lines are compared side by side on the same cached features.
    Matryoshka sizes scale with the embedding width."""
    path = DEFAULT_CONFIG.parent / f"{design}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in DEFAULT_CONFIG.parent.glob("*.yaml") if p != DEFAULT_CONFIG)
        raise FileNotFoundError(f"no design line {design!r} ({path} missing); known: {known}")
    line, base = load_config(path), load_config(DEFAULT_CONFIG)
    keep = {f"model.{key}": getattr(line.model, key) for key in DESIGN_KEYS}
    keep["model.mrl_dims"] = [d * base.model.embed_dim // line.model.embed_dim for d in line.model.mrl_dims]
    keep["output_dir"] = str(Path(base.output_dir).parent / f"testbed-{design}")
    return load_config(DEFAULT_CONFIG, **{**keep, **overrides})

# ----------------------------------------------------------------------------------------------
# Data: datasets, frozen encoders and their cached features

DATASETS = ("synthtouch", "tvl", "csv")


def make_dataset(cfg: TrainConfig, split: str):
    if cfg.dataset == "synthtouch":
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
        return data.SynthTouch(n, seed=cfg.data_seed, image_size=cfg.image_size, split=split)
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {DATASETS}")
    if not cfg.datasets_dir:
        raise ValueError(f"dataset {cfg.dataset!r} needs datasets_dir (--datasets_dir: the folder holding ssvtp/ and "
                         "hct/, or your train.csv)")
    # each image encoder gets its images at its own size
    sizes = {m: encoder_config(cfg, m).image_size for m in ("vision", "touch") if m in cfg.model.modalities}
    if cfg.dataset == "tvl":
        background = "touch" in sizes and encoder_config(cfg, "touch").background
        return data.TVLDataset(cfg.datasets_dir, split, sizes, subtract_background=background,
                               skip_missing=cfg.skip_missing)
    missing = set(cfg.model.modalities) - set(data.csv_modalities(cfg.datasets_dir))
    if missing:
        raise ValueError(f"model.modalities {list(cfg.model.modalities)} asks for {sorted(missing)}, but "
                         f"{cfg.datasets_dir}/train.csv has columns {data.csv_columns(cfg.datasets_dir)}; set "
                         f"model.modalities to {list(data.csv_modalities(cfg.datasets_dir))} or a subset")
    return data.CSVDataset(cfg.datasets_dir, split, sizes, skip_missing=cfg.skip_missing)


def encoder_config(cfg: TrainConfig, modality: str) -> EncoderConfig:
    """The frozen encoder of a modality (a TVL stage-1 checkpoint as touch weights sets its own architecture)."""
    spec = cfg.encoders[modality]
    if isinstance(spec, dict):
        spec = dict(spec)
        return resolve_encoder(spec.pop("name"), **spec)
    return resolve_encoder(spec)


_ENCODERS: dict[EncoderConfig, FrozenEncoder] = {}  # built once per process


def get_encoder(cfg: TrainConfig, modality: str) -> FrozenEncoder:
    enc_cfg = encoder_config(cfg, modality)
    if enc_cfg not in _ENCODERS:
        _ENCODERS[enc_cfg] = create_encoder(enc_cfg)
    return _ENCODERS[enc_cfg]


def split_data(cfg: TrainConfig, split: str):
    """(dataset, {modality: cached Features}) for one split; None when the dataset has no such split."""
    dataset = make_dataset(cfg, split)
    if dataset is None:
        return None, None
    device = core_device()
    feats = {m: data.cached_features(get_encoder(cfg, m), dataset, cfg.cache_dir, device=device)
             for m in cfg.model.modalities}
    return dataset, feats


def core_device() -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: TrainConfig) -> core.AlignmentModel:
    dims, tokens = {}, {}
    for m in cfg.model.modalities:
        enc = get_encoder(cfg, m)
        dims[m], tokens[m] = enc.dim, enc.num_tokens
    return core.AlignmentModel(cfg.model, dims, tokens)


def load_aligner(run_dir: str | os.PathLike) -> core.Aligner:
    """The trained phase-1 model of a run folder with its frozen encoders, in eval mode."""
    run = loop.RunFolder(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a phase-1 run folder (no config.yaml in it); pass the "
                                "--output_dir of a finished train.py run, e.g. runs/phase1/default")
    cfg = load_config(run.config_path)
    model = build_model(cfg)
    loop.load_trainable(model, run.load_weights(), run.path)
    return core.Aligner({m: get_encoder(cfg, m) for m in cfg.model.modalities}, model).eval()


# ----------------------------------------------------------------------------------------------
# Training: phase 1 through the one loop (loop.fit), which owns the run folder

class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local_slice(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share of a global batch (the global batch is the same on every rank)."""
        if len(indices) % self.world:
            raise ValueError(f"batch_size {len(indices)} is not divisible by {self.world} processes")
        per = len(indices) // self.world
        return indices[self.rank * per:(self.rank + 1) * per]


def to_yaml(cfg: TrainConfig) -> dict:
    values = cfg.to_dict()
    values["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values["model"].items()}
    return values


# what may differ when a run is resumed: where things are written and how often rows are logged
RESUME_IGNORES = ("output_dir", "log_name", "cache_dir", "log_every", "leakage_probes")


def run_folder(path, main: bool = True) -> loop.RunFolder:
    """A phase-1 run folder; its config.yaml is compared field by field, missing fields read as defaults."""
    return loop.RunFolder(path, main, defaults=to_yaml(TrainConfig()))


def train(cfg: TrainConfig, resume: bool = False, callback=None, overwrite: bool = False) -> Path:
    """Train phase 1 and return the run folder. `callback(row)` sees every metrics row (live plots).

    Ctrl-C saves a checkpoint before stopping; a non-finite loss, gradient or parameter stops with the
    last good checkpoint kept. A folder that already holds a run needs `resume` or `overwrite`.
    """
    loop.check_hyperparameters(cfg, "phase-1 config")
    dist = Distributed()
    device = core_device()
    run = run_folder(cfg.run_dir, main=dist.main)
    run.check_start(to_yaml(cfg), resume=resume, overwrite=overwrite, ignore=RESUME_IGNORES)
    if dist.world > 1 and not dist.main:
        torch.distributed.barrier()  # rank 0 fills the feature cache first: no two ranks write one cache folder
    _, train_feats = split_data(cfg, "train")
    val_set, val_feats = split_data(cfg, "val")
    if dist.world > 1 and dist.main:
        torch.distributed.barrier()
    torch.manual_seed(cfg.seed)  # the initial weights (torchrun broadcasts rank 0's anyway)
    model = build_model(cfg)
    model.set_feature_centres(train_feats)
    model = model.to(device)
    n = len(next(iter(train_feats.values())).pooled)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n} samples); "
                         f"use --batch_size {n} or less")
    run.start(to_yaml(cfg), resume=resume, overwrite=overwrite, ignore=RESUME_IGNORES)  # inputs are good: write
    ddp = model
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def load(index):  # runs in fit's reading thread, ahead of the step
        return {m: f.batch(dist.local_slice(index), device) for m, f in train_feats.items()}

    def loss_fn(batch):
        with autocast:
            return ddp(batch)

    def epoch_end(epoch):
        return quick_eval(model, val_feats, val_set) if val_feats is not None and dist.main else {}

    loop.fit(model, loss_fn, loop.index_batches(n, cfg.batch_size, cfg.seed, cfg.shuffle_block), steps_per_epoch,
             cfg, run, resume=resume, epoch_end=epoch_end, callback=callback, desc=f"phase 1: {cfg.run_dir.name}",
             rank=dist.rank, load=load)
    if dist.main:
        test_set, test_feats = split_data(cfg, "test")
        evaluate_run(model, test_feats, test_set, cfg.run_dir / "eval.json",
                     *((val_feats, val_set) if cfg.leakage_probes else ()))
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return cfg.run_dir


def ensure_trained(cfg: TrainConfig, callback=None) -> Path:
    """The run folder of `cfg`, training only what is missing: a finished run (eval.json) of the same config
    is reused, an interrupted one resumes, otherwise training starts. Re-running a notebook costs nothing.
    A folder holding a run of another config (epochs included) is refused, as on the command line."""
    run = run_folder(cfg.run_dir)
    if run.checkpoint is None:
        return train(cfg, callback=callback)
    run.check_same_config(to_yaml(cfg), RESUME_IGNORES)
    if (cfg.run_dir / "eval.json").is_file():
        return cfg.run_dir
    return train(cfg, resume=True, callback=callback)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl: {"kind": "step" | "epoch", ...}."""
    return loop.RunFolder(run_dir).rows()


def training_minutes(run_dir: str | os.PathLike) -> float:
    """Wall-clock training time of a run, summed over its epochs (a resumed run counts each epoch once)."""
    return sum(row["seconds"] for row in read_metrics(run_dir) if row["kind"] == "epoch") / 60

def factor_codes(dataset) -> dict | None:
    return dataset.factor_table() if hasattr(dataset, "factor_table") else None


def quick_eval(model, feats, dataset) -> dict:
    """Validation retrieval at k = n_shared (all k come in eval.json at the end)."""
    k = model.design.shared_k
    table = evaluate.evaluate_prefixes(model, feats, factor_codes(dataset), ks=[k])
    return {f"val {name}": float(value) for name, value in table.iloc[0].items() if "R@1" in name}


def evaluate_run(model, feats, dataset, out_path: Path, fit_feats=None, fit_set=None):
    fit_factors = factor_codes(fit_set) if fit_set is not None else None
    return evaluate.evaluate_run(model, feats, factor_codes(dataset), fit_feats, fit_factors, out_path=out_path)


def train_alignment(model: core.Aligner, loader, num_epochs: int, lr: float | None = None) -> dict:
    """The seed package's loop: raw (image, caption) batches through the frozen encoders into the
    adapters, by the same loop as everything else (loop.fit), without a run folder. Returns history
    {"loss": [mean loss per epoch], "contrastive": [...], ...}."""
    seed_cfg = getattr(model, "config", None) or core.AlignmentConfig()
    total = max(1, len(loader) * num_epochs)
    hp = argparse.Namespace(epochs=num_epochs, lr=lr or seed_cfg.learning_rate, weight_decay=seed_cfg.weight_decay,
                            warmup_steps=min(100, total // 10), grad_clip=math.inf, seed=seed_cfg.seed,
                            log_every=max(1, len(loader)))
    loop.check_hyperparameters(hp, "train_alignment")
    rows = loop.fit(model.model, model, lambda epoch: loader, len(loader), hp, desc="train_alignment")
    model.eval()
    history: dict[str, list[float]] = {}
    for row in rows:
        if row["kind"] == "epoch":
            for key, value in row.items():
                if key.startswith("train "):
                    history.setdefault(key[len("train "):], []).append(value)
    return history


# ----------------------------------------------------------------------------------------------
# Command line: the seed flags override the YAML file

FLAGS = {  # flag → (config key, type)
    "epochs": ("epochs", int), "batch_size": ("batch_size", int), "output_dir": ("output_dir", str),
    "log_name": ("log_name", str), "n_registers": ("model.n_registers", int), "n_shared": ("model.n_shared", int),
    "loss_type": ("model.loss_type", str), "flow_weight": ("model.flow_weight", float),
    "num_register_tokens": ("model.n_registers", int), "num_overlapping_tokens": ("model.n_shared", int),
    "nested_dropout_rate": ("model.nested_dropout_rate", float),
    "complementary_reg_weight": ("model.complementary_reg_weight", float),
    "lr": ("lr", float), "seed": ("seed", int),
}


@dataclass
class RunMode:
    resume: bool = False  # continue the run in output_dir
    overwrite: bool = False  # replace the run in output_dir


def parse_args(argv=None) -> tuple[TrainConfig, RunMode]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--stage1_checkpoint", help="TVL stage-1 checkpoint: its tactile encoder becomes the touch encoder")
    parser.add_argument("--datasets_dir", help="TVL data folder (ssvtp/, hct/) or your own (train.csv with columns among "
                        "vision, touch, caption); without it the SynthTouch testbed is used")
    for flag, (_, kind) in FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="any other config value, e.g. model.hidden_dim=256 (YAML syntax for the value)")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    args = parser.parse_args(argv)
    overrides = {}
    for flag, (key, _) in FLAGS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    cfg = load_config(args.config, **overrides)
    if args.datasets_dir:  # the folder says which layout it is; a CSV's columns say which modalities it has
        cfg.dataset, cfg.datasets_dir = data.dataset_layout(args.datasets_dir), args.datasets_dir
        if cfg.dataset == "csv" and "model.modalities" not in overrides:
            cfg.model.modalities = data.csv_modalities(args.datasets_dir)
    if args.stage1_checkpoint:  # its own architecture, image size and normalisation come with it
        cfg.encoders["touch"] = {"name": "tvl-touch-vit-tiny", "weights": args.stage1_checkpoint}
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    return cfg, RunMode(args.resume, args.overwrite)


def main(argv=None):
    cfg, mode = parse_args(argv)
    run_dir = train(cfg, resume=mode.resume, overwrite=mode.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {run_dir}\n{(run_dir / 'eval.json').read_text()[:2000]}")


if __name__ == "__main__":
    main()
