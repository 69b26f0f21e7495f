"""
Data for FlexAlign.

SynthTouch    a procedural touch-vision-language testbed whose latent factors are known, so the
              workbook can ask which register token carries which factor.
TVLDataset    the real Touch-Vision-Language layout (SSVTP + HCT subsets).
ImageTextDataset, create_dataloader, set_seed, get_device    the seed package's API.
cached_features    frozen-encoder features computed once per (encoder, dataset), memory-mapped.

Every dataset yields dicts; the touch-vision ones yield
{"vision": 3xSxS float in [0,1], "touch": same, "caption": str, "factors": dict, "index": int}.
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from core import Features, get_device, set_seed  # noqa: F401 (the seed API imports them from here too)

# -----------------------------------------------------------------------------
# SynthTouch


class SynthTouch(torch.utils.data.Dataset):
    # discrete latent factors, each drawn uniformly; this order is also the caption order
    FACTORS = OrderedDict(
        texture=["stripes", "checker", "dots", "waves"],
        orientation=["horizontal", "diagonal", "vertical", "antidiagonal"],
        roughness=["fine", "medium", "coarse"],
        color=["red", "green", "blue", "yellow", "purple"],
        lighting=["dim", "bright"],
        hardness=["soft", "medium", "hard"],
        pressure=["light", "firm"],
    )
    # continuous instance-level factors, name -> [low, high): the pattern's phase, so that exact-pair
    # retrieval has one right answer instead of a whole factor class
    CONTINUOUS_FACTORS = OrderedDict(phase_x=(0.0, 1.0), phase_y=(0.0, 1.0))
    # who sees what: shared factors reach both the camera and the gel, private ones only one of them
    factor_groups = dict(
        texture="shared", orientation="shared", roughness="shared", phase_x="shared", phase_y="shared",
        color="vision", lighting="vision",
        hardness="touch", pressure="touch",
    )
    # factor -> value -> caption adjective; adjectives are unique across factors so captions parse back
    ADJECTIVES = dict(
        texture=dict(stripes="striped", checker="checkered", dots="dotted", waves="wavy"),
        orientation=dict(horizontal="horizontal", diagonal="diagonal", vertical="vertical",
                         antidiagonal="antidiagonal"),
        roughness=dict(fine="fine", medium="grainy", coarse="coarse"),
        color=dict(red="red", green="green", blue="blue", yellow="yellow", purple="purple"),
        lighting=dict(dim="dim", bright="bright"),
        hardness=dict(soft="soft", medium="springy", hard="hard"),
        pressure=dict(light="gentle", firm="firm"),
    )
    FACTOR_OF_ADJECTIVE = {adjective: (name, value) for name, adjectives in ADJECTIVES.items()
                           for value, adjective in adjectives.items()}
    SPLITS = ("train", "val", "test")

    # rendering constants; lengths are fractions of the image so every image_size shows the same surface
    CYCLES = dict(fine=8.0, medium=5.0, coarse=3.0)  # pattern periods across the image
    RELIEF = dict(fine=0.6, medium=0.9, coarse=1.3)  # coarse surfaces have deeper grooves, felt as clearly
    WAVE_ANGLE = dict(horizontal=90, diagonal=45, vertical=0, antidiagonal=135)  # degrees, of the wave vector
    HUE = dict(red=(0.92, 0.16, 0.12), green=(0.18, 0.78, 0.22), blue=(0.20, 0.38, 0.96),
               yellow=(0.95, 0.85, 0.15), purple=(0.62, 0.22, 0.82))
    LIGHT = dict(dim=0.5, bright=1.0)
    DEPTH = dict(soft=1.0, medium=0.65, hard=0.4)  # soft objects sink deeper into the gel ...
    BLUR = dict(soft=0.03, medium=0.015, hard=0.004)  # ... and smear the imprint (Gaussian sigma)
    CONTACT_RADIUS = dict(light=0.27, firm=0.41)
    GEL = np.array([0.70, 0.78, 0.90], dtype=np.float32)  # pale bluish background of a DIGIT sensor
    LED_ANGLES = np.deg2rad([0.0, 120.0, 240.0]).astype(np.float32)  # red, green, blue LEDs on three sides

    def __init__(self, n, seed=0, image_size=64, split="train"):
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size!r}")
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {', '.join(self.SPLITS)}; got {split!r}")
        self.n, self.seed, self.image_size, self.split = int(n), int(seed), int(image_size), split
        self.split_id = self.SPLITS.index(split)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        streams = self._streams(i)
        sample = self._render(self._draw_factors(streams[0]), streams)
        sample["index"] = int(i)
        return sample

    @property
    def fingerprint(self):
        return f"synthtouch-v1-n{self.n}-seed{self.seed}-s{self.image_size}-{self.split}"

    @property
    def captions(self):
        return [self.caption_of(self.factors_of(i)) for i in range(self.n)]

    def factors_of(self, i):
        return self._draw_factors(self._streams(i)[0])

    def factor_table(self):
        # discrete factors as integer codes into FACTORS[name], continuous ones as floats
        rows = [self.factors_of(i) for i in range(self.n)]
        table = {name: np.array([values.index(r[name]) for r in rows]) for name, values in self.FACTORS.items()}
        table.update({name: np.array([r[name] for r in rows]) for name in self.CONTINUOUS_FACTORS})
        return table

    def render(self, factors, seed):
        """One sample from chosen factors; the rest, and the noise, come from `seed`."""
        for name, value in factors.items():
            if name in self.FACTORS:
                if value not in self.FACTORS[name]:
                    raise ValueError(f"factor {name!r} has no value {value!r}; allowed: {self.FACTORS[name]}")
            elif name in self.CONTINUOUS_FACTORS:
                low, high = self.CONTINUOUS_FACTORS[name]
                if not low <= value < high:
                    raise ValueError(f"factor {name!r} value {value!r} is outside [{low}, {high})")
            else:
                raise ValueError(f"unknown factor {name!r} (value {value!r}); "
                                 f"allowed factors: {list(self.FACTORS) + list(self.CONTINUOUS_FACTORS)}")
        streams = self._streams_from(np.random.SeedSequence(seed))
        # draw every factor first so that fixing one factor never shifts the others
        sample = self._render({**self._draw_factors(streams[0]), **factors}, streams)
        sample["index"] = -1
        return sample

    @classmethod
    def caption_of(cls, factors):
        return ", ".join(cls.ADJECTIVES[name][factors[name]] for name in cls.FACTORS)

    @classmethod
    def parse_caption(cls, caption):
        """Caption -> {factor: value or None}. Reads words, not comma fields, so free text from the decoder
        parses too; unknown words are ignored and the first adjective per factor wins."""
        parsed = dict.fromkeys(cls.FACTORS)
        for word in re.findall(r"[a-z]+", caption.lower()):
            name, value = cls.FACTOR_OF_ADJECTIVE.get(word, (None, None))
            if name is not None and parsed[name] is None:
                parsed[name] = value
        return parsed

    # --- internals

    def _streams(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for SynthTouch of length {self.n}")
        return self._streams_from(np.random.SeedSequence([self.seed, self.split_id, int(i)]))

    @staticmethod
    def _streams_from(seed_sequence):
        # factors, vision noise and touch noise each get their own stream, so no modality's noise
        # depends on factor values or on the other modality: private factors stay pixel-exactly private
        return [np.random.default_rng(s) for s in seed_sequence.spawn(3)]

    def _draw_factors(self, rng):
        factors = {name: values[rng.integers(len(values))] for name, values in self.FACTORS.items()}
        factors.update({name: float(rng.uniform(low, high)) for name, (low, high) in self.CONTINUOUS_FACTORS.items()})
        return factors

    def _render(self, f, streams):
        _, vision_rng, touch_rng = streams
        size = self.image_size
        x = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5  # pixel centres, image centre at 0
        X, Y = x[None, :], x[:, None]  # Y grows downwards, as rows do

        # the surface pattern p(x, y) in [0, 1]: the shared factors, seen identically by both modalities
        # (python floats keep every array float32, which is what makes a sample cost well under a millisecond)
        angle = math.radians(self.WAVE_ANGLE[f["orientation"]])
        cycles = self.CYCLES[f["roughness"]]
        across = cycles * (X * math.cos(angle) + Y * math.sin(angle)) + f["phase_x"]  # in pattern periods
        along = cycles * (Y * math.cos(angle) - X * math.sin(angle)) + f["phase_y"]
        if f["texture"] == "stripes":
            p = 0.5 + 0.5 * np.tanh(3 * np.cos(2 * np.pi * across))
        elif f["texture"] == "checker":  # bricks, long along the lines, rather than squares: orientation shows
            p = 0.5 + 0.5 * np.tanh(3 * np.cos(2 * np.pi * across) * np.cos(np.pi * along))
        elif f["texture"] == "dots":  # oval dots, long along the lines, again so orientation shows
            d_across, d_along = across - np.round(across), along - np.round(along)
            p = 0.5 + 0.5 * np.tanh((1 - np.sqrt((d_across / 0.25) ** 2 + (d_along / 0.4) ** 2)) / 0.2)
        else:  # waves
            p = 0.5 + 0.5 * np.cos(2 * np.pi * (across + 0.3 * np.sin(np.pi * along)))

        # vision: the pattern printed in the sample's colour, under its lighting, seen by a noisy camera
        # (images are built channels-first: numpy is several times faster than with a trailing 3)
        hue = np.array(self.HUE[f["color"]], dtype=np.float32)[:, None, None]
        vision = self.LIGHT[f["lighting"]] * (0.12 + 0.88 * hue * p)
        noise = 0.06 * (vision_rng.random(vision.shape, dtype=np.float32) - 0.5)  # uniform: 5x cheaper than normal
        vision = vision * vision_rng.uniform(0.92, 1.08) + noise

        # touch: a DIGIT-like gel pressed by the surface inside a contact disk; the gel's height map is
        # rendered photometrically, as three coloured LEDs from different sides light its slopes
        radius = self.CONTACT_RADIUS[f["pressure"]]
        contact = np.clip((radius - np.sqrt(X ** 2 + Y ** 2)) / 0.03, 0, 1)  # soft-edged contact patch
        pressed = self.DEPTH[f["hardness"]] * contact * (0.4 + self.RELIEF[f["roughness"]] * p)
        height = self._blur(pressed, self.BLUR[f["hardness"]] * size)
        slope_y, slope_x = np.gradient(height, 1 / size)  # slopes per image width, size-independent
        cos, sin = np.cos(self.LED_ANGLES)[:, None, None], np.sin(self.LED_ANGLES)[:, None, None]
        led_falloff = 0.06 * (cos * X + sin * Y)  # each LED brightens its own side of the gel
        shading = 0.018 * (cos * slope_x + sin * slope_y)
        touch = self.GEL[:, None, None] + led_falloff - shading - 0.06 * height
        touch = touch * touch_rng.uniform(0.95, 1.05) + 0.05 * (touch_rng.random(touch.shape, dtype=np.float32) - 0.5)

        return dict(vision=_tensor(vision), touch=_tensor(touch), caption=self.caption_of(f), factors=f)

    @staticmethod
    def _blur(image, sigma):
        # Gaussian blur in the Fourier domain: numpy's FFT is single-threaded, whereas a BLAS matrix
        # product spawns threads that crawl when DataLoader workers or other jobs hold the cores.
        # The FFT wraps around the border, where the gel is flat, so the wrap is invisible.
        freq_y, freq_x = np.fft.fftfreq(image.shape[0])[:, None], np.fft.rfftfreq(image.shape[1])[None, :]
        gain = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (freq_x ** 2 + freq_y ** 2)).astype(np.float32)
        return np.fft.irfft2(np.fft.rfft2(image) * gain, s=image.shape)


def _tensor(chw):
    return torch.from_numpy(np.ascontiguousarray(np.clip(chw, 0, 1), dtype=np.float32))


# -----------------------------------------------------------------------------
# real data: TVL (Fu et al. 2024)


def load_image(path, image_size):
    """Image file -> 3xSxS float tensor in [0,1]; a file PIL cannot decode raises ValueError."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except FileNotFoundError:  # a missing file is not a corrupt one; its own error already names it
        raise
    except OSError as e:  # PIL's UnidentifiedImageError and truncated-file errors are both OSErrors
        raise ValueError(f"image {path} is corrupt or not a decodable image ({e})") from e
    return _tensor(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255)


class TVLDataset(torch.utils.data.Dataset):
    LAYOUT = ("{root}/ssvtp/{split}.csv (column url = images_rgb/image_N_rgb.jpg, captions in "
              "ssvtp/text/labels_N.txt) and/or {root}/hct/data{{1,2,3}}/{split}.csv "
              "(header url,tactile,tactile_background,caption)")

    def __init__(self, root, split="train", image_size=224):
        if split not in ("train", "test"):
            raise ValueError(f"TVL split must be train or test; got {split!r}")
        self.root, self.split, self.image_size = os.path.abspath(root), split, image_size
        expected = self.LAYOUT.format(root=self.root, split=split)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"TVL root {self.root} does not exist; expected {expected}")
        self.rows = self._ssvtp_rows() + self._hct_rows()  # (vision path, touch path, caption)
        if not self.rows:
            raise FileNotFoundError(f"no TVL {split}.csv with rows found under {self.root}; expected {expected}")

    def _ssvtp_rows(self):
        folder = os.path.join(self.root, "ssvtp")
        table = os.path.join(folder, f"{self.split}.csv")
        if not os.path.isfile(table):
            return []
        rows = []
        with open(table, newline="") as file:
            for record in csv.DictReader(file):
                url = record["url"]
                number = re.search(r"image_(\d+)_rgb", url)
                if number is None:
                    raise ValueError(f"{table}: url {url!r} does not look like images_rgb/image_N_rgb.jpg")
                with open(os.path.join(folder, "text", f"labels_{number.group(1)}.txt")) as labels:
                    caption = labels.readline().strip()
                rows.append((os.path.join(folder, url), os.path.join(folder, url.replace("rgb", "tac")), caption))
        return rows

    def _hct_rows(self):
        rows = []
        for k in (1, 2, 3):
            folder = os.path.join(self.root, "hct", f"data{k}")
            table = os.path.join(folder, f"{self.split}.csv")
            if os.path.isfile(table):
                with open(table, newline="") as file:
                    for record in csv.DictReader(file):
                        rows.append((os.path.join(folder, record["url"]), os.path.join(folder, record["tactile"]),
                                     record["caption"].strip()))
        return rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        vision, touch, caption = self.rows[i]
        return dict(vision=load_image(vision, self.image_size), touch=load_image(touch, self.image_size),
                    caption=caption, factors={}, index=int(i))

    @property
    def captions(self):
        return [caption for _, _, caption in self.rows]

    @property
    def fingerprint(self):
        digest = hashlib.sha1(f"{self.root}|{self.split}|{len(self.rows)}".encode()).hexdigest()[:12]
        return f"tvl-{self.split}-s{self.image_size}-{digest}"


# -----------------------------------------------------------------------------
# the seed package's image-text API


class ImageTextDataset(torch.utils.data.Dataset):
    """Pairs of (image, caption); images are file paths, PIL images or 3xHxW tensors, loaded lazily."""

    def __init__(self, images, captions, image_size=224):
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions; they must pair up")
        self.images, self.captions, self.image_size = images, captions, image_size

    @classmethod
    def from_pairs(cls, dataset, modality="vision", image_size=224):
        """View any dataset whose items have `modality` and `caption` keys (SynthTouch, TVLDataset)."""
        captions = dataset.captions if hasattr(dataset, "captions") else _Column(dataset, "caption")
        return cls(_Column(dataset, modality), captions, image_size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, size = self.images[i], self.image_size
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, size)
        elif isinstance(image, Image.Image):
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            image = _tensor(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255)
        else:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image tensors must be 3xHxW, got shape {tuple(image.shape)}")
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            if image.shape[1:] != (size, size):
                image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
        return dict(image=image, caption=self.captions[i])


class _Column:
    """One key of a dataset's items, as a lazy sequence."""

    def __init__(self, dataset, key):
        self.dataset, self.key = dataset, key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][self.key]


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


def create_dataloader(dataset, batch_size, shuffle=True, num_workers=0, seed=0, drop_last=False):
    generator = torch.Generator().manual_seed(seed)  # the same seed gives the same batches
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       collate_fn=collate, generator=generator, drop_last=drop_last)


# ----------------------------------------------------------------------------------------------
# Feature cache: frozen features are computed once per (encoder, dataset, modality) and memory-mapped.

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
                    batch_size: int = 64, verify: bool = True, device: str | torch.device = "cpu") -> Features:
    """Frozen features of `dataset` under `encoder`, computed once and then read from disk.

    The cache folder is named by the dataset fingerprint, the modality and a hash of the encoder
    config, and is written to a temporary folder that is renamed into place only when complete, with
    checksums, so an interrupted or damaged cache is detected and rebuilt, never silently used.
    """
    modality = encoder.modality
    folder = Path(cache_dir) / f"{dataset.fingerprint}-{modality}-{encoder.cfg.model_name}-{encoder.cfg.key()}"
    cached = _load_cache(folder, verify)
    if cached is not None:
        return cached
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n, key = len(dataset), ("caption" if modality == "text" else modality)
    pooled = np.lib.format.open_memmap(tmp / "pooled.npy", "w+", np.float32, (n, encoder.dim))
    tokens = np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.float16, (n, encoder.num_tokens, encoder.dim))
    mask = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.bool_, (n, encoder.num_tokens))
    encoder.to(device)
    loader = create_dataloader(dataset, batch_size, shuffle=False)
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
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return _load_cache(folder, verify=False)
