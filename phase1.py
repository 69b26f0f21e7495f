"""A phase-1 run as data: its config (`TrainConfig`, read from YAML by `load_config`; `design_on_testbed`) and
what that config builds: the datasets (`make_dataset`), the frozen encoders (`get_encoder`, each built once per
process), their cached features (`split_data`), the model (`build_model`), all of it at once for training
(`prepared`), and a finished run loaded back (`load_aligner`, `run_folder`). Training them is train.py's; phase 2, the notebooks and the benchmarks build
on this module without importing the training script."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

import alignment
import designs
import feature_cache
import layouts
import loop
import synthtouch
from config import load_dataclass
from encoders import MODALITIES, EncoderConfig, FrozenEncoder, create_encoder, resolve_encoder
from features import Features

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
# what may differ when a run is resumed: where things are written and how often rows are logged
RESUME_IGNORES = ("output_dir", "log_name", "cache_dir", "log_every", "leakage_probes")


@dataclass
class TrainConfig:
    # frozen encoders per modality: a name from encoders.ENCODERS, or {name: ..., weights: ..., ...overrides}
    encoders: dict = field(default_factory=lambda: {"vision": "synth-vision", "touch": "synth-touch",
                                                    "text": "minilm"})
    model: designs.ModelConfig = field(default_factory=designs.ModelConfig)
    # data: the SynthTouch testbed, the TVL layout under datasets_dir, or your own CSV files (dataset: csv)
    dataset: str = "synthtouch"
    datasets_dir: str | None = None
    skip_missing: bool = False  # real data: drop rows whose files are missing (counted in one warning)
    # real data: every file a dataset's tables name must lie inside datasets_dir (no absolute paths, `../` or links
    # out of it), so a table cannot make a run read files elsewhere; true for a dataset that points elsewhere
    paths_outside_dataset: bool = False
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
    # the step under bf16 autocast on the CPU too (on a GPU it always is): pays on CPUs with AVX-512 BF16 or AMX
    # at the seed config's width (bench/bench_step.py), not at the testbed's, nor on CPUs without them
    cpu_bf16: bool = False
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
        if not isinstance(self.encoders, dict) or set(self.encoders) - set(MODALITIES):
            raise ValueError(f"encoders must map modalities among {MODALITIES} to encoders, got {self.encoders!r}; "
                             "e.g. encoders.vision=synth-vision")
        for name in ("n_train", "n_val", "n_test") if self.dataset == "synthtouch" else ():
            if getattr(self, name) < 1:
                default = TrainConfig.__dataclass_fields__[name].default
                raise ValueError(f"{name} must be at least 1 (the size of the SynthTouch {name[2:]} split), got "
                                 f"{getattr(self, name)}; e.g. {name}: {default}")
        loop.check_hyperparameters(self, "phase-1 config")
        missing = [m for m in self.model.modalities if m not in self.encoders]
        if missing:
            raise ValueError(f"encoders {self.encoders!r} has no encoder for {missing}, which model.modalities trains; "
                             f"name one for each, e.g. encoders.{missing[0]}={TrainConfig().encoders[missing[0]]}")
        if self.batch_size < 2:  # InfoNCE tells each sample from the others of its batch: alone, it has none
            raise ValueError(f"batch_size {self.batch_size} leaves the contrastive loss no other sample in the batch to "
                             "tell apart; use 2 or more, e.g. --batch_size 64")
        if Path(self.output_dir).name in ("", ".."):  # the run's lock file sits beside its folder, in the parent
            raise ValueError(f"output_dir {self.output_dir!r} names no folder of its own; name the run's folder, e.g. "
                             "--output_dir runs/phase1/mine")
        for name in ("output_dir", "log_name", "cache_dir", "datasets_dir"):
            if "\0" in str(getattr(self, name) or ""):
                raise ValueError(f"{name} {getattr(self, name)!r} holds a NUL byte (\\0), which no file name can; "
                                 "remove it")
        if not isinstance(self.data_seed, int) or self.data_seed < 0:
            raise ValueError(f"data_seed must be an integer of at least 0, got {self.data_seed!r}; e.g. data_seed: 0")
        if self.log_name is not None and (Path(self.log_name).is_absolute() or ".." in Path(self.log_name).parts
                                          or not str(self.log_name).strip()):
            raise ValueError(f"log_name {self.log_name!r} must name a sub-folder inside output_dir (no absolute path, "
                             "no '..'): a run is written only inside output_dir; e.g. log_name: flextok-base")
        run, cache = Path(os.path.abspath(self.run_dir)), Path(os.path.abspath(self.cache_dir))
        if cache == run or run in cache.parents:  # its entries would be files the run folder did not write
            raise ValueError(f"cache_dir {self.cache_dir!r} lies in the run folder {self.run_dir}, which holds only "
                             "what a run writes (a folder holding anything else is refused as a run); keep the "
                             "feature cache apart, e.g. cache_dir: cache/features (the default), where every run "
                             "shares it")
        if self.shuffle_block < 1:
            raise ValueError(f"shuffle_block must be at least 1 (1: a plain shuffle), got {self.shuffle_block}; "
                             "e.g. shuffle_block: 1024")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A YAML config (configs/default.yaml when None) with overrides; model fields as "model.<name>"."""
    return load_dataclass(TrainConfig, path or DEFAULT_CONFIG, overrides)


# what a design line keeps when it moves to the testbed; data, encoders, width and optimisation come from default.yaml
DESIGN_KEYS = ("design", "n_registers", "n_shared", "attention", "nested_dropout", "nested_dropout_rate", "loss_type",
               "flow_weight", "preservation_weight", "complementary_reg_weight")


def design_on_testbed(design: str, **overrides) -> TrainConfig:
    """configs/<design>.yaml's design (register counts, attention, dropout, losses) at the testbed's data,
    encoders and width, so the three design lines are compared side by side on the same cached features."""
    output_dir = str(Path(load_config(DEFAULT_CONFIG).output_dir).parent / f"testbed-{design}")
    return load_config(DEFAULT_CONFIG, **{**design_overrides(design), "output_dir": output_dir, **overrides})


def design_overrides(design: str, base: str | os.PathLike = DEFAULT_CONFIG) -> dict:
    """The overrides of the config `base` (default: configs/default.yaml, `design_on_testbed`) that put
    configs/<design>.yaml's design on it. Matryoshka sizes scale with the embedding width."""
    path = DEFAULT_CONFIG.parent / f"{design}.yaml"
    if design not in designs.DESIGNS or not path.is_file():
        raise FileNotFoundError(f"no design line {design!r} ({path} missing); known: {sorted(designs.DESIGNS)}")
    line, base = load_config(path), load_config(base)
    keep = {f"model.{key}": getattr(line.model, key) for key in DESIGN_KEYS}
    keep["model.mrl_dims"] = [d * base.model.embed_dim // line.model.embed_dim for d in line.model.mrl_dims]
    return keep

# ----------------------------------------------------------------------------------------------
# Data: datasets, frozen encoders and their cached features

DATASETS = ("synthtouch", *layouts.LAYOUTS)


def make_dataset(cfg: TrainConfig, split: str):
    if cfg.dataset == "synthtouch":
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
        return synthtouch.SynthTouch(n, seed=cfg.data_seed, image_size=cfg.image_size, split=split)
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {DATASETS}")
    if not cfg.datasets_dir:
        raise ValueError(f"dataset {cfg.dataset!r} needs datasets_dir (--datasets_dir: the folder holding ssvtp/ and "
                         "hct/, or your train.csv)")
    # each image encoder gets its images at its own size
    sizes = {m: encoder_config(cfg, m).image_size for m in ("vision", "touch") if m in cfg.model.modalities}
    background = "touch" in sizes and encoder_config(cfg, "touch").background
    return layouts.LAYOUTS[cfg.dataset].for_run(cfg.datasets_dir, split, sizes, cfg.model.modalities,
                                             skip_missing=cfg.skip_missing, touch_background=background,
                                             outside=cfg.paths_outside_dataset)


def encoder_config(cfg: TrainConfig, modality: str) -> EncoderConfig:
    """The frozen encoder of a modality (a TVL stage-1 checkpoint as touch weights sets its own architecture)."""
    spec = cfg.encoders[modality]
    if isinstance(spec, dict):
        spec = dict(spec)
        return resolve_encoder(spec.pop("name"), **spec)
    return resolve_encoder(spec)


_ENCODERS: dict[EncoderConfig, FrozenEncoder] = {}  # built once per process


def built_encoder(enc_cfg: EncoderConfig) -> FrozenEncoder:
    if enc_cfg not in _ENCODERS:
        _ENCODERS[enc_cfg] = create_encoder(enc_cfg)
    return _ENCODERS[enc_cfg]


def get_encoder(cfg: TrainConfig, modality: str) -> FrozenEncoder:
    return built_encoder(encoder_config(cfg, modality))


def split_data(cfg: TrainConfig, split: str):
    """(dataset, {modality: cached Features}) for one split; None when the dataset has no such split."""
    dataset = make_dataset(cfg, split)
    if dataset is None:
        return None, None
    device = core_device()
    # encoders are built (once per process) only where a cache is missing
    feats = {m: feature_cache.cached_features(encoder_config(cfg, m), dataset, cfg.cache_dir, device=device,
                                     build=built_encoder) for m in cfg.model.modalities}
    return dataset, feats


def core_device() -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: TrainConfig, feats: dict[str, Features] | None = None,
                weights: dict[str, torch.Tensor] | None = None) -> alignment.AlignmentModel:
    """The phase-1 model of `cfg`, sized for its encoders' features: read off `feats` (cached features of those
    encoders, N×T×D tokens) or off a checkpoint's `weights` when given, so that neither training from a warm
    cache nor loading a trained model builds an encoder."""
    sizes = None if weights is None else designs.DESIGNS[cfg.model.design](cfg.model).input_sizes(weights)
    if sizes is not None:
        return alignment.AlignmentModel(cfg.model, *sizes)
    dims, tokens = {}, {}
    for m in cfg.model.modalities:
        if feats is not None:
            tokens[m], dims[m] = feats[m].tokens.shape[1:]
        else:
            enc = get_encoder(cfg, m)
            dims[m], tokens[m] = enc.dim, enc.num_tokens
    return alignment.AlignmentModel(cfg.model, dims, tokens)


def load_aligner(run_dir: str | os.PathLike) -> alignment.Aligner:
    """The trained phase-1 model of a run folder with its frozen encoders, in eval mode, from any working directory.
    The model is sized from its checkpoint and each encoder is built when first used (`core.Aligner.encoder`)."""
    run = loop.RunFolder(run_dir)
    cfg = run_config(run.path)
    weights = run.load_weights()
    model = build_model(cfg, weights=weights)
    loop.load_trainable(model, weights, run)
    return alignment.Aligner({m: functools.partial(get_encoder, cfg, m) for m in cfg.model.modalities}, model).eval()


def finished_weights(run_dir: str | os.PathLike) -> str:
    """The identity (sha256) of a finished run's weights, what a run built on them records; a run that never
    finished all its epochs (interrupted, or training now) is refused: its weights are still to change."""
    cfg, run = run_config(run_dir), run_folder(run_dir)
    if run.checkpoint is not None and not run.trained(cfg.epochs):
        where = run.position()
        raise ValueError(f"the phase-1 run {run.path} never finished: its checkpoint is at step {where['step']}, "
                         f"{where['epoch']} of its {cfg.epochs} epochs done (it was interrupted, or is training now), "
                         "and its weights would still change under what is built on them. Finish it first (the "
                         "train.py command line that started it, with --resume), or pass a finished run")
    return run.weights_digest()  # without a checkpoint: the error that says so


def run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The config a run folder was trained with, its paths (data, feature cache, encoder weights) resolved from
    the run folder, where config.yaml keeps them relative (`to_yaml`); a run saved before that kept them relative to
    the working directory it was trained from, which is where they are looked for when not beside the run."""
    run = loop.RunFolder(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a phase-1 run folder (no config.yaml in it); pass the "
                                "--output_dir of a finished train.py run, e.g. runs/phase1/default")
    return map_paths(load_config(run.config_path), lambda path: from_run(path, run.path))


def to_run(path: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """A path as a run's config.yaml keeps it: relative to the run folder (`from_run` reads it back), or absolute."""
    return str(path) if os.path.isabs(path) else os.path.relpath(path, run_dir)


def from_run(path: str, run_dir: Path) -> str:
    """A path as a run's config.yaml keeps it, made usable from here: relative to the run folder, or, for a run saved
    before paths were kept that way, relative to the working directory when only there."""
    beside = run_dir / path  # an absolute path stays itself
    return path if not beside.exists() and os.path.exists(path) else str(beside)


def map_paths(cfg: TrainConfig, change) -> TrainConfig:
    """`cfg` with change(path) for every file or folder it names: datasets_dir, cache_dir, encoder weights."""
    encoders = {m: {**spec, "weights": change(spec["weights"])} if isinstance(spec, dict) and spec.get("weights")
                else spec for m, spec in cfg.encoders.items()}
    return dataclasses.replace(cfg, encoders=encoders, cache_dir=change(cfg.cache_dir),
                               datasets_dir=cfg.datasets_dir and change(cfg.datasets_dir))


def to_yaml(cfg: TrainConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """The config as config.yaml keeps it; with `run_dir`, the relative paths it names made relative to that run
    folder instead of the working directory, so the run reads from anywhere (`run_config`); absolute ones stay."""
    if run_dir is not None:
        cfg = map_paths(cfg, lambda path: to_run(path, run_dir))
    values = cfg.to_dict()
    values["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values["model"].items()}
    return values


def run_folder(path, main: bool = True) -> loop.RunFolder:
    """A phase-1 run folder; its config.yaml is compared field by field, missing fields read as defaults."""
    return loop.RunFolder(path, main, defaults=to_yaml(TrainConfig()))


# ----------------------------------------------------------------------------------------------
# Training's inputs, built at once

@dataclass
class Prepared:
    """What training a phase-1 config takes (`prepared`): its run folder, held and checked; torchrun's ranks; each
    split as (dataset, {modality: cached Features}) or (None, None); the model; an epoch's batches (this rank's share of
    each global batch, `loop.index_batches`); the step's autocast."""
    run: loop.Opening
    dist: loop.Distributed
    device: torch.device
    splits: dict[str, tuple]
    model: alignment.AlignmentModel
    steps_per_epoch: int
    batches: Callable[[int], list]
    autocast: torch.autocast


@contextlib.contextmanager
def prepared(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Iterator[Prepared]:
    """Everything train.train needs for `cfg`, in the order that writes nothing a refusal would leave behind: the run
    folder held for this trainer and checked (`loop.RunFolder.opened`; `loop.fit` writes it), then every split's
    cached features (rank 0 of a torchrun job fills the cache first; the test split on rank 0 only, which evaluates),
    then the model with the initial weights of `cfg.seed`, on this rank's device."""
    loop.check_hyperparameters(cfg, "phase-1 config")
    dist = loop.Distributed()
    device = core_device()
    run = run_folder(cfg.run_dir, main=dist.main)
    with run.opened(to_yaml(cfg, cfg.run_dir), resume, overwrite, RESUME_IGNORES) as opened:
        with dist.main_first():  # rank 0 fills the feature cache: no two ranks write one cache folder
            splits = {split: split_data(cfg, split) for split in ("train", "val")}
            splits["test"] = split_data(cfg, "test") if dist.main else (None, None)
        train_feats = splits["train"][1]
        torch.manual_seed(cfg.seed)  # the initial weights (torchrun broadcasts rank 0's anyway)
        model = build_model(cfg, train_feats)
        model.set_feature_centres(train_feats)
        model = model.to(device)
        n = len(next(iter(train_feats.values())).pooled)
        steps_per_epoch = n // cfg.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n} samples); "
                             f"use --batch_size {n} or less")
        if device.type == "cpu" and cfg.cpu_bf16 and not loop.cpu_has_bf16_units():
            warnings.warn("cpu_bf16 is true, but this CPU has no AVX-512 BF16 or AMX units: PyTorch emulates bf16 on it, "
                          "and a step takes 10-30x as long as in float32 (bench/bench_step.py --bf16). Set "
                          "cpu_bf16: false in the config (or --set cpu_bf16=false); it pays only on CPUs with those units")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cfg.cpu_bf16)
        global_batches = loop.index_batches(n, cfg.batch_size, cfg.seed, cfg.shuffle_block)
        yield Prepared(opened, dist, device, splits, model, steps_per_epoch,
                       lambda epoch: [dist.local_slice(index) for index in global_batches(epoch)], autocast)
