"""Phase 1: train register-token alignment on cached frozen features.

    python train.py                                   # configs/default.yaml: SynthTouch on a CPU
    python train.py --config configs/fluxtalk.yaml --epochs 5 --output_dir runs/fluxtalk
    torchrun --nproc_per_node=4 train.py --config configs/flextok.yaml --datasets_dir /data/tvl

One config dataclass (YAML + flags), one loop (AdamW, warm-up + cosine, bf16 autocast on GPU), one
checkpoint format (model.safetensors + config.yaml + state.pt), written atomically. A run folder holds
config.yaml, model.safetensors, state.pt, metrics.jsonl and, at the end, eval.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

import core
import data

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


@dataclass
class TrainConfig:
    # frozen encoders per modality: a name from core.ENCODERS, or {name: ..., weights: ..., ...overrides}
    encoders: dict = field(default_factory=lambda: {"vision": "synth-vision", "touch": "synth-touch",
                                                    "text": "minilm"})
    model: core.ModelConfig = field(default_factory=core.ModelConfig)
    # data: the SynthTouch testbed, or the TVL layout under datasets_dir
    dataset: str = "synthtouch"
    datasets_dir: str | None = None
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
    log_every: int = 10  # steps between loss rows in metrics.jsonl
    # output
    output_dir: str = "runs/phase1/default"
    log_name: str | None = None  # a sub-folder of output_dir, as in the TVL seed command lines
    cache_dir: str = "cache/features"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.log_name if self.log_name else Path(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        core.check_fields(values, cls)
        model = values.pop("model", {}) or {}
        core.check_fields(model, core.ModelConfig, "model")
        return cls(model=core.ModelConfig(**model), **values)


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A YAML config (configs/default.yaml when None) with overrides; model fields as "model.<name>"."""
    return TrainConfig.from_dict(core.read_config(path or DEFAULT_CONFIG, overrides, nested="model"))


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

def make_dataset(cfg: TrainConfig, split: str):
    if cfg.dataset == "synthtouch":
        n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
        return data.SynthTouch(n, seed=cfg.data_seed, image_size=cfg.image_size, split=split)
    if cfg.dataset == "tvl":
        if not cfg.datasets_dir:
            raise ValueError("dataset 'tvl' needs datasets_dir (the folder holding ssvtp/ and hct/)")
        if split == "val":
            return None  # TVL ships train and test only
        return data.TVLDataset(cfg.datasets_dir, split=split, image_size=cfg.image_size)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose 'synthtouch' or 'tvl'")


def encoder_config(cfg: TrainConfig, modality: str) -> core.EncoderConfig:
    spec = cfg.encoders[modality]
    if isinstance(spec, dict):
        spec = dict(spec)
        return core.resolve_encoder(spec.pop("name"), **spec)
    return core.resolve_encoder(spec)


_ENCODERS: dict[core.EncoderConfig, core.FrozenEncoder] = {}  # built once per process


def get_encoder(cfg: TrainConfig, modality: str) -> core.FrozenEncoder:
    enc_cfg = encoder_config(cfg, modality)
    if enc_cfg not in _ENCODERS:
        _ENCODERS[enc_cfg] = core.create_encoder(enc_cfg)
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
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = core.load_weights(build_model(cfg), run_dir / "model.safetensors", "phase-1 model")
    return core.Aligner({m: get_encoder(cfg, m) for m in cfg.model.modalities}, model).eval()


# ----------------------------------------------------------------------------------------------
# Optimisation

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (no decay on norms, biases, registers and the temperature) with linear warm-up + cosine."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p.shape[0] > 1]
    no_decay = [p for p in params if not (p.dim() >= 2 and p.shape[0] > 1)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def schedule(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


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


class NonFiniteLoss(RuntimeError):
    pass


def save_checkpoint(run_dir: Path, cfg: TrainConfig, model, opt, sched, step: int, epoch: int, batch_in_epoch: int,
                    rng: dict | None = None):
    core.save_weights(model, run_dir / "model.safetensors", metadata={"step": str(step)})
    core.save_state({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng or core.rng_state(),
                     "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}, run_dir / "state.pt")
    core.atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(to_yaml(cfg), sort_keys=False)))


def to_yaml(cfg: TrainConfig) -> dict:
    values = cfg.to_dict()
    values["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values["model"].items()}
    return values


def check_resumable(run_dir: Path, cfg: TrainConfig):
    saved = load_config(run_dir / "config.yaml")
    def flat(values):  # model fields as "model.<name>", so the message names the one that differs
        return {**{k: v for k, v in values.items() if k != "model"},
                **{f"model.{k}": v for k, v in values["model"].items()}}
    mine, theirs = flat(to_yaml(cfg)), flat(to_yaml(saved))
    ignore = {"epochs", "output_dir", "log_name", "cache_dir", "log_every"}
    diff = {k: (theirs[k], mine[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}
    if diff:
        raise ValueError(f"cannot resume {run_dir}: it was trained with another config; differences "
                         f"(saved, requested): {diff}. Resume with the saved config.yaml, or use a new output_dir")


def train(cfg: TrainConfig, resume: bool = False, callback=None) -> Path:
    """Train phase 1 and return the run folder. `callback(row)` sees every metrics row (live plots).

    Ctrl-C saves a checkpoint before stopping; a NaN/inf loss stops with the last good checkpoint kept.
    """
    dist = Distributed()
    device = core_device()
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    if resume:
        if not (run_dir / "state.pt").is_file():
            raise FileNotFoundError(f"nothing to resume in {run_dir} (no state.pt); drop --resume to start fresh")
        check_resumable(run_dir, cfg)
    if dist.world > 1 and not dist.main:
        torch.distributed.barrier()  # rank 0 fills the feature cache first: no two ranks write one cache folder
    _, train_feats = split_data(cfg, "train")
    val_set, val_feats = split_data(cfg, "val")
    if dist.world > 1 and dist.main:
        torch.distributed.barrier()
    model = build_model(cfg).to(device)
    n = len(next(iter(train_feats.values())).pooled)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n} samples)")
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, steps_per_epoch * cfg.epochs)
    step, start_epoch, skip = 0, 0, 0
    if resume:
        core.load_weights(model, run_dir / "model.safetensors", "phase-1 model")
        state = core.load_state(run_dir / "state.pt")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        core.set_rng_state(state["rng"])
        step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
    ddp = model
    if dist.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=cfg.model.loss_type == "flow_matching")
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"

    def log(row):
        if dist.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if callback is not None:
            callback(row)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    rng = None  # the RNG state at the start of an unfinished step: an interrupt restarts that step with it
    bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=step, desc=f"phase 1: {run_dir.name}", disable=not dist.main)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            order = epoch_order(n, cfg.seed, epoch)
            sums, count, started = {}, 0, time.perf_counter()
            for batch_in_epoch in range(skip if epoch == start_epoch else 0, steps_per_epoch):
                rng = core.rng_state()
                index = dist.local_slice(order[batch_in_epoch * cfg.batch_size:(batch_in_epoch + 1) * cfg.batch_size])
                batch = {m: f.batch(np.sort(index), device) for m, f in train_feats.items()}
                with autocast:
                    loss, parts = ddp(batch)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"loss became {loss.item()} at step {step} (epoch {epoch}); parts: "
                                        f"{ {k: v.item() for k, v in parts.items()} }. The last good checkpoint in "
                                        f"{run_dir} is kept; lower lr (now {cfg.lr}) or check the features")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                rng = None
                bar.update()
                values = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if step % cfg.log_every == 0:
                    log({"kind": "step", "step": step, "epoch": epoch, "lr": sched.get_last_lr()[0], **values})
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
            row = {"kind": "epoch", "step": step, "epoch": epoch, "seconds": time.perf_counter() - started,
                   **{f"train {k}": v / max(count, 1) for k, v in sums.items()}}
            if val_feats is not None and dist.main:
                row.update(quick_eval(model, val_feats, val_set))
            log(row)
            if dist.main:
                save_checkpoint(run_dir, cfg, model, opt, sched, step, epoch + 1, 0)
    except KeyboardInterrupt:
        if dist.main:
            # resume at the first step not completed (the loop variables may point at a finished one)
            save_checkpoint(run_dir, cfg, model, opt, sched, step, *divmod(step, steps_per_epoch), rng=rng)
            print(f"interrupted at step {step}: checkpoint saved in {run_dir}; continue with --resume")
        raise
    finally:
        bar.close()
    if dist.main:
        test_set, test_feats = split_data(cfg, "test")
        evaluate_run(model, test_feats, test_set, run_dir / "eval.json")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return run_dir


def ensure_trained(cfg: TrainConfig, callback=None) -> Path:
    """The run folder of `cfg`, training only what is missing: a finished run (eval.json) of the same config
    is reused, an interrupted one resumes, otherwise training starts. Re-running a notebook costs nothing."""
    run_dir = cfg.run_dir
    if (run_dir / "config.yaml").is_file():
        check_resumable(run_dir, cfg)
        if (run_dir / "eval.json").is_file():
            if load_config(run_dir / "config.yaml").epochs != cfg.epochs:
                raise ValueError(f"{run_dir} holds a finished run with another number of epochs; "
                                 "pick a new output_dir to train again")
            return run_dir
    return train(cfg, resume=(run_dir / "state.pt").is_file(), callback=callback)

def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl: {"kind": "step" | "epoch", ...}."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def training_minutes(run_dir: str | os.PathLike) -> float:
    """Wall-clock training time of a run, summed over its epochs (a resumed run counts each epoch once)."""
    return sum(row["seconds"] for row in read_metrics(run_dir) if row["kind"] == "epoch") / 60

def factor_codes(dataset) -> dict | None:
    return dataset.factor_table() if hasattr(dataset, "factor_table") else None


def quick_eval(model, feats, dataset) -> dict:
    """Validation retrieval at k = n_shared (all k come in eval.json at the end)."""
    import evaluate
    k = model.cfg.n_shared if model.cfg.design != "adapter" else 1
    table = evaluate.evaluate_prefixes(model, feats, factor_codes(dataset), ks=[k])
    return {f"val {name}": float(value) for name, value in table.iloc[0].items() if "R@1" in name}


def evaluate_run(model, feats, dataset, out_path: Path):
    import evaluate
    return evaluate.evaluate_prefixes(model, feats, factor_codes(dataset), out_path=out_path)


def train_alignment(model: core.Aligner, loader, num_epochs: int, lr: float | None = None) -> dict:
    """The seed package's loop: raw (image, caption) batches through the frozen encoders into the
    adapters. Returns history {"loss": [mean loss per epoch], "contrastive": [...]}."""
    seed_cfg = getattr(model, "config", None)
    lr = lr or (seed_cfg.learning_rate if seed_cfg else 1e-4)
    weight_decay = seed_cfg.weight_decay if seed_cfg else 0.01
    total = max(1, len(loader) * num_epochs)
    opt, sched = make_optimizer(model.model, lr, weight_decay, min(100, total // 10), total)
    history: dict[str, list[float]] = {}
    for epoch in tqdm(range(num_epochs), desc="train_alignment"):
        model.train()
        sums, count = {}, 0
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False):
            loss, parts = model(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        for k, v in sums.items():
            history.setdefault(k, []).append(v / max(count, 1))
    model.eval()
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


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--stage1_checkpoint", help="TVL stage-1 checkpoint: its tactile encoder becomes the touch encoder")
    parser.add_argument("--datasets_dir", help="TVL data folder (ssvtp/, hct/); without it the SynthTouch testbed is used")
    for flag, (_, kind) in FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="any other config value, e.g. model.hidden_dim=256 (YAML syntax for the value)")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its state.pt")
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
    if args.datasets_dir:
        cfg.dataset, cfg.datasets_dir = "tvl", args.datasets_dir
    if args.stage1_checkpoint:
        cfg.encoders["touch"] = {"name": "tvl-touch-vit-tiny", "weights": args.stage1_checkpoint,
                                 "image_size": cfg.image_size}
    return cfg, args.resume


def main(argv=None):
    cfg, resume = parse_args(argv)
    run_dir = train(cfg, resume=resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {run_dir}\n{(run_dir / 'eval.json').read_text()[:2000]}")


if __name__ == "__main__":
    main()
