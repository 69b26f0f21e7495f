"""The feature cache: frozen features computed once per (encoder, dataset, modality), memory-mapped, written under a
lock into a folder that is swapped in only when complete, with checksums, so a damaged cache is rebuilt, never used."""
from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from config import READ_ONLY_ERRORS, make_folder
from encoders import create_encoder
from features import Features

_CACHE_FILES = ("pooled", "tokens", "mask")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_cache(folder: Path, verify: bool) -> Features | None:
    """The cached features, or None when the folder is missing, partial or corrupt."""
    if not folder.is_dir():
        return None  # never cached: nothing to report
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in _CACHE_FILES]
        for name, arr in zip(_CACHE_FILES, arrays):
            if list(arr.shape) != meta["shapes"][name]:
                raise ValueError(f"{name}.npy has shape {arr.shape}, meta.json says {meta['shapes'][name]}")
            if verify and _sha256(folder / f"{name}.npy") != meta["sha256"][name]:
                raise ValueError(f"{name}.npy does not match its checksum")
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as err:  # OSError: a file is missing
        warnings.warn(f"feature cache {folder} is corrupt or partial ({err}); rebuilding it")
        return None
    return Features(*arrays)


def cached_features(encoder, dataset, cache_dir: str | os.PathLike = "cache/features",
                    batch_size: int = 64, verify: bool = True, device: str | torch.device = "cpu",
                    build=None) -> Features:
    """Frozen features of `dataset` under `encoder`, computed once and then read from disk.

    The cache folder is named by the dataset fingerprint, the modality and a hash of the encoder
    config, and is written to a temporary folder that is renamed into place only when complete, with
    checksums, so an interrupted or damaged cache is detected and rebuilt, never silently used.
    `encoder` is a FrozenEncoder or its EncoderConfig; a config is built into an encoder (by `build`, default
    encoders.create_encoder) only when the cache must be written: building one imports open_clip or timm, ~10 s
    of a process that only reads.
    """
    enc_cfg = getattr(encoder, "cfg", encoder)
    modality = enc_cfg.modality
    folder = Path(cache_dir) / f"{dataset.fingerprint}-{modality}-{enc_cfg.model_name}-{enc_cfg.key()}"
    make_folder(folder.parent, "cache_dir")
    try:
        lock = open(folder.with_name(folder.name + ".lock"), "a")
    except OSError as err:
        if err.errno not in READ_ONLY_ERRORS:
            raise
        return _read_only_cache(folder, verify, err)
    # One process builds a cache folder at a time (several notebooks, or torchrun ranks, may ask at once);
    # the others wait for the lock and then find the finished cache.
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _sweep_builds(folder)
        cached = _load_cache(folder, verify)
        if cached is None:
            if encoder is enc_cfg:
                encoder = (build or create_encoder)(enc_cfg)
            _build_cache(encoder, dataset, folder, batch_size, device)
            cached = _load_cache(folder, verify=False)
    return cached


def _read_only_cache(folder: Path, verify: bool, err: OSError) -> Features:
    """A cache_dir nothing can be written in (shared read-only, say): no build can run there either, so its complete
    caches are read without the lock; a missing one cannot be written, which the message says."""
    cached = _load_cache(folder, verify)
    if cached is None:
        raise PermissionError(f"cache_dir {folder.parent} is read-only ({err.strerror}), and the features "
                              f"{folder.name} are not cached there yet, so they cannot be computed into it; make it "
                              "writable, or pass a cache_dir of your own (--set cache_dir=DIR)") from None
    return cached


def _sweep_builds(folder: Path):
    """What a build of `folder` that was killed left (its lock is held now, so no build of it runs): a partial
    `.tmp<pid>` folder is deleted; a complete cache set aside (`.old<pid>`) just before the new one would have taken
    its place goes back when nothing took it."""
    for leftover in sorted(folder.parent.glob(f"{glob.escape(folder.name)}.old*")):
        if not folder.exists():
            os.replace(leftover, folder)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in folder.parent.glob(f"{glob.escape(folder.name)}.tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _build_cache(encoder, dataset, folder: Path, batch_size: int, device):
    """Encode into a temporary folder, then swap it in (old → aside, new → place, old deleted), so the
    folder holds a complete cache at every moment; a failed encode leaves no temporary folder behind."""
    modality = encoder.modality
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n, key = len(dataset), ("caption" if modality == "text" else modality)
        pooled = np.lib.format.open_memmap(tmp / "pooled.npy", "w+", np.float32, (n, encoder.dim))
        tokens = np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.float16, (n, encoder.num_tokens, encoder.dim))
        mask = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.bool_, (n, encoder.num_tokens))
        encoder.to(device)
        loader = torch.utils.data.DataLoader(dataset, batch_size, collate_fn=collate)
        start = 0
        for batch in tqdm(loader, desc=f"encoding {modality} ({encoder.cfg.model_name})", leave=False):
            inputs = batch[key] if modality == "text" else batch[key].to(device)
            out = encoder(inputs)
            stop = start + len(out.pooled)
            pooled[start:stop], tokens[start:stop], mask[start:stop] = (
                out.pooled.cpu().numpy(), out.tokens.cpu().numpy(), out.mask.cpu().numpy())
            start = stop
        for arr in (pooled, tokens, mask):
            arr.flush()
        del pooled, tokens, mask
        meta = {"dataset": dataset.fingerprint, "modality": modality, "encoder": dataclasses.asdict(encoder.cfg),
                "shapes": {name: list(np.load(tmp / f"{name}.npy", mmap_mode="r").shape) for name in _CACHE_FILES},
                "sha256": {name: _sha256(tmp / f"{name}.npy") for name in _CACHE_FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = folder.with_name(folder.name + f".old{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def collate(batch):
    """Stack tensors, keep strings as lists, turn factor dicts into {name: list of values}."""
    out = {}
    for key, first in batch[0].items():
        values = [item[key] for item in batch]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, dict):
            out[key] = {name: [v[name] for v in values] for name in first}
        elif isinstance(first, (int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
