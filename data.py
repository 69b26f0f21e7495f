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
import fcntl
import glob
import hashlib
import io
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

from config import atomic_write, make_folder
from core import get_device, set_seed  # noqa: F401 (the seed API imports them from here too)
from features import Features

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
    # retrieval has one right answer instead of a whole factor class. A quarter period, not a whole one: over a
    # whole period the phase moved 62 % of the frozen tokens' variance (v4) and drowned the fine factors
    CONTINUOUS_FACTORS = OrderedDict(phase_x=(0.0, 0.25), phase_y=(0.0, 0.25))
    # how `_render` draws each phase, per texture: the period in pattern periods (φ and φ + period draw the
    # same surface), None where the texture does not depend on it (stripes run along y). A probe predicts
    # the phase on that circle (evaluate.probe_target); a test checks these against the renderer.
    PHASE_PERIODS = {"phase_x": dict(stripes=1, checker=1, dots=1, waves=1),
                     "phase_y": dict(stripes=None, checker=2, dots=1, waves=1)}
    # fine, local factors: one value in [0, 1) per tile of a side×side grid, so that knowing them takes many
    # numbers, each about a small part of the image; this is what later register tokens are there for.
    # wear rubs the pattern off the central tiles, bleaching the ink and lowering the surface (seen and felt;
    # nine numbers that also make each sample one of a kind for exact-pair retrieval), stain darkens the ink of
    # each quarter of the picture to brown (seen only), compliance lets the central tiles sink deeper into the
    # gel (felt only). A value is a tuple of side² floats, row by row.
    DETAILS = OrderedDict(wear=3, stain=2, compliance=2)
    # how much of the image each grid covers: half the side of a centred square, in image widths. Every tile is
    # a whole number of the frozen encoders' 8-pixel patches at 64 pixels (wear 16, stain 32, compliance 16 px),
    # so no tile straddles a patch; wear and compliance do not share tile borders, so the gel tells them apart
    DETAIL_EXTENT = dict(wear=0.375, stain=0.5, compliance=0.25)
    # coarse factors are about the whole image, fine ones about its parts (the information map's order)
    SCALE = dict(texture="coarse", orientation="coarse", roughness="coarse", phase_x="coarse", phase_y="coarse",
                 color="coarse", lighting="coarse", hardness="coarse", pressure="coarse",
                 wear="fine", stain="fine", compliance="fine")
    # who sees what: shared factors reach both the camera and the gel, private ones only one of them
    factor_groups = dict(
        texture="shared", orientation="shared", roughness="shared", phase_x="shared", phase_y="shared",
        color="vision", lighting="vision",
        hardness="touch", pressure="touch",
        wear="shared", stain="vision", compliance="touch",
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
    VERSION = "synthtouch-v5"  # changes whenever what a seed renders changes: it keys the feature cache

    # rendering constants; lengths are fractions of the image so every image_size shows the same surface
    CYCLES = dict(fine=8.0, medium=5.0, coarse=3.0)  # pattern periods across the image
    RELIEF = dict(fine=0.6, medium=0.9, coarse=1.3)  # coarse surfaces have deeper grooves, felt as clearly
    WAVE_ANGLE = dict(horizontal=90, diagonal=45, vertical=0, antidiagonal=135)  # degrees, of the wave vector
    HUE = dict(red=(0.92, 0.16, 0.12), green=(0.18, 0.78, 0.22), blue=(0.20, 0.38, 0.96),
               yellow=(0.95, 0.85, 0.15), purple=(0.62, 0.22, 0.82))
    LIGHT = dict(dim=0.5, bright=1.0)
    DEPTH = dict(soft=1.0, medium=0.65, hard=0.4)  # soft objects sink deeper into the gel ...
    BLUR = dict(soft=0.03, medium=0.015, hard=0.004)  # ... and smear the imprint (Gaussian sigma)
    CONTACT_RADIUS = dict(light=0.30, firm=0.41)
    STAIN_HUE = np.array([0.45, 0.30, 0.12], dtype=np.float32)  # brown
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
        return f"{self.VERSION}-n{self.n}-seed{self.seed}-s{self.image_size}-{self.split}"

    @property
    def captions(self):
        return [self.caption_of(self.factors_of(i)) for i in range(self.n)]

    def factors_of(self, i):
        return self._draw_factors(self._streams(i)[0])

    def factor_table(self):
        # discrete factors as integer codes into FACTORS[name], continuous ones as floats, details as N×side²
        rows = [self.factors_of(i) for i in range(self.n)]
        table = {name: np.array([values.index(r[name]) for r in rows]) for name, values in self.FACTORS.items()}
        table.update({name: np.array([r[name] for r in rows]) for name in (*self.CONTINUOUS_FACTORS, *self.DETAILS)})
        return table

    @classmethod
    def describe(cls, name: str) -> str:
        """A factor's values in words, for tables."""
        if name in cls.FACTORS:
            return ", ".join(cls.FACTORS[name])
        if name in cls.DETAILS:
            return f"{cls.DETAILS[name]}×{cls.DETAILS[name]} tiles, each in [0, 1)"
        return "continuous in [%g, %g)" % cls.CONTINUOUS_FACTORS[name]

    @classmethod
    def is_continuous(cls, name: str) -> bool:
        """Whether a probe regresses the factor (R²) rather than classifying it (accuracy)."""
        return name in cls.CONTINUOUS_FACTORS or name in cls.DETAILS

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
            elif name in self.DETAILS:
                tiles = self.DETAILS[name] ** 2
                if np.shape(value) != (tiles,) or not all(0 <= v < 1 for v in value):
                    raise ValueError(f"factor {name!r} needs {tiles} values in [0, 1), one per tile; got {value!r}")
                factors = {**factors, name: tuple(float(v) for v in value)}
            else:
                raise ValueError(f"unknown factor {name!r} (value {value!r}); allowed factors: "
                                 f"{list(self.FACTORS) + list(self.CONTINUOUS_FACTORS) + list(self.DETAILS)}")
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
        # every tile is drawn whatever the other values, so no factor shifts the random numbers of another
        factors.update({name: tuple(rng.uniform(0, 1, side * side).tolist()) for name, side in self.DETAILS.items()})
        return factors

    def _tiles(self, name, values, outside, X, Y):
        """size×size map of a detail: each pixel gets its tile's value, `outside` beyond the grid."""
        side, extent = self.DETAILS[name], self.DETAIL_EXTENT[name]
        grid = np.asarray(values, dtype=np.float32).reshape(side, side)
        col = np.floor((X + extent) / (2 * extent) * side).astype(int)
        row = np.floor((Y + extent) / (2 * extent) * side).astype(int)
        inside = (col >= 0) & (col < side) & (row >= 0) & (row < side)
        return np.where(inside, grid[row.clip(0, side - 1), col.clip(0, side - 1)], np.float32(outside))

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
        else:  # waves: lines as sharp as the stripes', swaying with period one along their length, so that
            # they do not share checker's period two (v3's soft waves did, and retrieval mixed the two up)
            p = 0.5 + 0.5 * np.tanh(3 * np.cos(2 * np.pi * (across + 0.2 * np.sin(2 * np.pi * along))))

        # wear, shared: on the worn tiles the pattern is rubbed away, flat and bleached pale to the eye, smooth
        # and lower to the gel. Each of these moves the tile's mean, not only its pattern: a fine factor that only
        # took the pattern away moved 1 % of the frozen tokens' variance (v4)
        wear = self._tiles("wear", f["wear"], 0.0, X, Y)
        relief = p * (1 - wear)
        p_worn = relief + wear

        # vision: the pattern printed in the sample's colour, its ink stained brown and darker quarter by quarter,
        # under its lighting, seen by a noisy camera (channels-first: numpy is several times faster than with a
        # trailing 3)
        stain = self._tiles("stain", f["stain"], 0.0, X, Y)[None]
        hue = (1 - 0.8 * stain) * np.array(self.HUE[f["color"]], dtype=np.float32)[:, None, None] + \
            0.8 * stain * self.STAIN_HUE[:, None, None]
        hue = hue + 0.8 * wear * (1 - hue)  # worn ink bleaches toward white
        vision = self.LIGHT[f["lighting"]] * (0.12 + 0.88 * hue * p_worn) * (1 - 0.5 * stain)
        noise = 0.06 * (vision_rng.random(vision.shape, dtype=np.float32) - 0.5)  # uniform: 5x cheaper than normal
        vision = vision * vision_rng.uniform(0.92, 1.08) + noise

        # touch: a DIGIT-like gel pressed by the surface inside a contact disk; the gel's height map is
        # rendered photometrically, as three coloured LEDs from different sides light its slopes
        radius = self.CONTACT_RADIUS[f["pressure"]]
        contact = np.clip((radius - np.sqrt(X ** 2 + Y ** 2)) / 0.03, 0, 1)  # soft-edged contact patch
        give = 0.2 + 1.6 * self._tiles("compliance", f["compliance"], 0.5, X, Y)  # 1 outside the central tiles
        # the surface's body (lowered where worn) and its grooves: the body's depth makes compliance and wear felt
        # in every pixel of a tile, not only along the pattern's edges
        body = 0.8 * (1 - 0.6 * wear)
        pressed = self.DEPTH[f["hardness"]] * contact * give * (body + self.RELIEF[f["roughness"]] * relief)
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
# real data: TVL (Fu et al. 2024) and your own CSV files


def open_image(path) -> Image.Image:
    """An image file as RGB, as an image viewer shows it (as_seen); a missing file raises FileNotFoundError, an
    undecodable one ValueError, naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist; fix the path in the CSV, or pass skip_missing=True "
                                "(config: skip_missing: true) to drop rows whose files are missing")
    try:
        with Image.open(path) as image:
            return as_seen(image)
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError and truncation are OSErrors
        raise ValueError(f"image {path} is corrupt, not a decodable image or too large to decode safely ({e}); "
                         "replace it, or pass skip_missing=True to drop rows whose files cannot be read") from e
    except ValueError as e:  # as_seen's: values it cannot show
        raise ValueError(f"image {path} is {e}") from e


def as_seen(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows the file: turned by its EXIF orientation (phones store portraits sideways), 16-bit
    grey scaled to 8 bits (PIL's convert("RGB") clips it, and a 16-bit image comes out white), 32-bit float grey
    in [0, 1] or [0, 255] scaled alike (clipped, it comes out black), transparency (alpha, or a palette's
    transparent colour) laid over white."""
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(pixels).all() and 0 <= low and high <= 255):  # no scale a viewer would agree on
            raise ValueError(f"a float image with values in [{low:g}, {high:g}]; save it as 8- or 16-bit, or as floats "
                             "in [0, 1]")
        image = Image.fromarray(np.clip(pixels * (255 if high <= 1 else 1) + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        pixels = np.asarray(image, dtype=np.float32)
        peak = 65535 if image.mode != "I" or pixels.max() > 255 else 255
        image = Image.fromarray(np.clip(pixels * (255 / peak) + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def resized(image: Image.Image, image_size: int) -> torch.Tensor:
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return _tensor(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255)


def load_image(path, image_size):
    """Image file -> 3xSxS float tensor in [0,1] (a plain resize)."""
    return resized(open_image(path), image_size)


def image_batch(images, image_size: int) -> torch.Tensor:
    """One image or a list of them (file paths, PIL images, 3xHxW tensors) or a Bx3xHxW tensor, as one batch: files
    and PIL images read and resized to image_size as a CSV dataset's are; tensors as given, so that an encoder's
    check names what is wrong with them (0-255 values, another size)."""
    if torch.is_tensor(images):
        return images
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not images:
        raise ValueError("the image list is empty; pass at least one image (a file path, a PIL image or a 3xSxS "
                         "tensor)")
    images = [load_image(x, image_size) if isinstance(x, (str, os.PathLike)) else
              resized(as_seen(x), image_size) if isinstance(x, Image.Image) else x for x in images]
    if not all(torch.is_tensor(x) and x.dim() == 3 for x in images):
        raise ValueError(f"images must be file paths, PIL images or 3xSxS tensors in [0, 1]; got "
                         f"{[getattr(x, 'shape', type(x).__name__) for x in images][:4]}")
    if len({tuple(x.shape) for x in images}) > 1:
        raise ValueError(f"image tensors have different shapes {sorted({tuple(x.shape) for x in images})}; resize "
                         "them to one size, or pass file paths or PIL images (resized for you)")
    return torch.stack(images)


# TVL's image preparation (tvl_enc/tacvis.py, load_vision_data / load_tactile_data), without its training
# augmentations: frozen features are computed once, so every epoch sees the evaluation-time preparation.
TVL_CROP_SCALE = math.sqrt(2) * 0.18  # the vision crop's side, as a fraction of the image's longer side
TVL_DATA3_TOP = 200  # HCT data3 frames are cropped 200 px from the top, as its captions were labelled


def tvl_vision(path, image_size: int, subset: str) -> torch.Tensor:
    """A square crop of side ceil(sqrt(2)*0.18*max(h, w)), centred for SSVTP, at the top centre for HCT
    (200 px down in data3), resized to image_size."""
    import torchvision.transforms.functional as TF
    image = open_image(path)
    width, height = image.size
    side = int(math.ceil(TVL_CROP_SCALE * max(width, height)))
    if subset == "ssvtp":
        image = TF.center_crop(image, side)
    else:
        image = TF.crop(image, TVL_DATA3_TOP if subset == "data3" else 0, (width - side) // 2, side, side)
    return resized(image, image_size)


def _pad_and_rotate(image: Image.Image) -> Image.Image:
    """TVL's tac_padding: zero-pad the shorter side to a square, then rotate 90 degrees counter-clockwise."""
    import torchvision.transforms.functional as TF
    width, height = image.size
    side = max(width, height)
    return TF.rotate(TF.pad(image, [(side - width) // 2, (side - height) // 2]), 90)


def tvl_touch(path, image_size: int, background=None) -> torch.Tensor:
    """The tactile image padded to a square, rotated, resized. With `background` (HCT's tactile_background),
    the background image, prepared the same way, is subtracted at full resolution first, as TVL's
    subtract_background does: the result is signed, in [-1, 1], and the encoder normalises it with TVL's
    background statistics (encoders.TVL_TACTILE_MEAN_STD)."""
    import torchvision.transforms.functional as TF
    image = _pad_and_rotate(open_image(path))
    if background is None:
        return resized(image, image_size)
    difference = TF.to_tensor(image) - TF.to_tensor(_pad_and_rotate(open_image(background)))
    return TF.resize(difference, [image_size, image_size], antialias=True)


SPLIT_SEED = 42  # TVL's random_state for its train/val split; also splits CSV datasets without val/test files
VAL_FRACTION = 0.1


def split_rows(rows: list, part: str, fraction: float = VAL_FRACTION) -> list:
    """TVL's split of a train.csv: sklearn's train_test_split(train_size=1 - fraction, random_state=42),
    `part` 'train' or 'held' (the held-out fraction)."""
    from sklearn.model_selection import train_test_split
    if len(rows) < 2:  # nothing to hold out: a single row trains
        return rows if part == "train" else []
    kept, held = train_test_split(rows, train_size=1 - fraction, random_state=SPLIT_SEED)
    return kept if part == "train" else held


def _caption_codes(captions: list[str]) -> np.ndarray:
    """Each caption's index among the distinct captions: items with the same code have the same caption."""
    codes = {}
    return np.array([codes.setdefault(c, len(codes)) for c in captions])


class FileRows(torch.utils.data.Dataset):
    """Rows of image files and captions: what TVLDataset and CSVDataset share. A row is a dict with
    "caption" and image paths under IMAGE_KEYS; `load(modality, row)` prepares one image."""
    IMAGE_KEYS = ("vision", "touch")

    def __init__(self, rows: list[dict], image_sizes: dict[str, int], where: str):
        if not rows:
            raise FileNotFoundError(f"{where}: no rows with readable images")
        self.rows, self.image_sizes = rows, dict(image_sizes)

    def readable_rows(self, rows: list[dict], where: str) -> list[dict]:
        """The rows whose files all exist; a missing file fails naming it, unless skip_missing drops its row
        (missing or undecodable files then count in one warning). A file outside the dataset's folder (`root`)
        fails unless the dataset was opened with outside=True."""
        if not self.outside:
            for row in rows:
                for path in self._files(row):
                    if not self._inside(path):
                        raise ValueError(f"{where}: the row {row.get('caption') or ''!r} names {path}, which lies "
                                         f"outside the dataset folder {os.path.realpath(self.root)} (an absolute "
                                         "path, '..' or a link out of it); move the file inside, or allow it with "
                                         "paths_outside_dataset: true (--set paths_outside_dataset=true)")
        if not self.skip_missing:
            for row in rows:
                for path in self._files(row):
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{where}: file {path} does not exist; fix the path, or pass "
                                                "skip_missing=True (config: skip_missing: true) to drop such rows")
            return rows
        readable = [row for row in rows if self._readable(row)]
        if len(readable) < len(rows):
            warnings.warn(f"{where}: skipped {len(rows) - len(readable)} of {len(rows)} rows whose files are missing "
                          "or unreadable (skip_missing=True)")
        return readable

    def _files(self, row):
        return [row[key] for key in self.IMAGE_KEYS if row.get(key)]

    def _inside(self, path) -> bool:
        root = os.path.realpath(self.root)
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    @staticmethod
    def _decodable(path) -> bool:
        try:
            Image.open(path).close()  # reads the header only: cheap enough for every row
        except OSError:  # missing, or not an image
            return False
        return True

    def _readable(self, row) -> bool:
        return (all(os.path.isfile(path) for path in self._files(row))
                and all(self._decodable(row[key]) for key in self.IMAGE_KEYS if row.get(key)))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        item = {m: self.load(m, row) for m in self.image_sizes}
        return dict(item, caption=row["caption"], factors={}, index=int(i))

    @property
    def captions(self):
        return [row["caption"] for row in self.rows]

    def factor_table(self):
        """What real data knows about its items: which ones share a caption (caption-level retrieval)."""
        return {"caption": _caption_codes(self.captions)}

    @property
    def fingerprint(self):
        """What the cached features of this dataset depend on: the recipe, and every file's size, modification and
        change time, so replacing an image (same path, same row count) gives a new cache — even one given the old
        size and modification time (cp -p, rsync -t, touch -r): the change time is the kernel's, no tool sets it."""
        files = [(path, *_stat(path)) for row in self.rows for path in self._files(row) + [row.get("background")]
                 if path]
        recipe = json.dumps([type(self).__name__, self.root, self.split, self.image_sizes, self.skip_missing,
                             self.rows, files], sort_keys=True, default=str)
        digest = hashlib.sha1(recipe.encode()).hexdigest()[:12]
        return f"{type(self).__name__.lower()}-{self.split}-{digest}"


def _stat(path) -> tuple[int, int, int]:
    try:
        stat = os.stat(path)
    except OSError:  # checked when the rows were read; a file gone since then fails when it is loaded
        return -1, -1, -1
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def tvl_records(table: str, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a TVL CSV (read as read_csv_table reads a CSV dataset's), after checking its header has the
    columns TVL's layout gives it."""
    header, records = read_csv_table(Path(table))
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{table} has the header {header} but TVL's layout needs the columns "
                         f"{list(columns)} (missing {missing}); fix its first line, e.g. {','.join(columns)}")
    return records


class TVLDataset(FileRows):
    """The Touch-Vision-Language layout: ssvtp/ and hct/data{1,2,3}/, prepared as TVL prepares it.

    split "train" and "val" are TVL's 90/10 split of each subset's train.csv (seed 42), "test" its test.csv.
    image_size: one size, or {modality: size} so each encoder gets images at its own size; only the image
    modalities named there are loaded. subtract_background: subtract HCT's tactile_background image (and, for
    SSVTP, ssvtp/tac_background.png, TVL's tvl_enc/data/tac_background.png), as TVL's subtract_background.
    """
    IMAGE_KEYS = ("vision", "touch", "background")
    LAYOUT = ("{root}/ssvtp/{split}.csv (column url = images_rgb/image_N_rgb.jpg, captions in "
              "ssvtp/text/labels_N.txt) and/or {root}/hct/data{{1,2,3}}/{split}.csv "
              "(header url,tactile,tactile_background,caption); or, for your own data, {root}/train.csv with "
              "columns among vision,touch,caption")

    @classmethod
    def for_run(cls, root, split: str, sizes: dict[str, int], modalities, skip_missing: bool, touch_background: bool,
                outside: bool = False):
        """The split a phase-1 run asks for (LAYOUTS: every layout takes these arguments)."""
        return cls(root, split, sizes, subtract_background=touch_background, skip_missing=skip_missing, outside=outside)

    def __init__(self, root, split="train", image_size=224, subtract_background=False, skip_missing=False,
                 outside=False):
        if split not in ("train", "val", "test"):
            raise ValueError(f"TVL split must be train, val or test; got {split!r}")
        self.root, self.split, self.subtract_background = os.path.abspath(root), split, subtract_background
        self.skip_missing, self.outside = skip_missing, outside
        where = f"TVL {split} under {self.root}"
        table = "test" if split == "test" else "train"
        expected = self.LAYOUT.format(root=self.root, split=table)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"TVL root {self.root} does not exist; expected {expected}")
        # TVL drops SSVTP rows without images, then splits each subset on its own
        rows = self.readable_rows(self._ssvtp_rows(table) + self._hct_rows(table), where)
        self.check_not_swapped(rows, where)
        for row in rows:  # an SSVTP caption is the first line of its labels file
            del row["gel"]
            if "labels" in row:
                with open(row.pop("labels")) as file:
                    row["caption"] = file.readline().strip()
        subsets = [[r for r in rows if r["subset"] == "ssvtp"], [r for r in rows if r["subset"] != "ssvtp"]]
        if split != "test":
            subsets = [split_rows(rows, "train" if split == "train" else "held") for rows in subsets]
        rows = subsets[0] + subsets[1]
        if not rows:
            raise FileNotFoundError(f"no TVL {table}.csv with rows found under {self.root}; expected {expected}")
        sizes = image_size if isinstance(image_size, dict) else {"vision": image_size, "touch": image_size}
        super().__init__(rows, sizes, where)

    def _ssvtp_rows(self, table_name):
        folder = os.path.join(self.root, "ssvtp")
        table = os.path.join(folder, f"{table_name}.csv")
        if not os.path.isfile(table):
            return []
        background = os.path.join(folder, "tac_background.png") if self.subtract_background else None
        if background and not os.path.isfile(background):
            raise FileNotFoundError(f"subtract_background needs SSVTP's tactile background image at {background}; "
                                    "copy TVL's tvl_enc/data/tac_background.png there, or train without it")
        rows = []
        for record in tvl_records(table, ("url",)):
            url = record["url"]
            number = re.search(r"image_(\d+)_rgb", url)
            if number is None:
                raise ValueError(f"{table}: url {url!r} does not look like images_rgb/image_N_rgb.jpg")
            labels = os.path.join(folder, "text", f"labels_{number.group(1)}.txt")
            rows.append(dict(vision=os.path.join(folder, url), touch=os.path.join(folder, url.replace("rgb", "tac")),
                             background=background, labels=labels, subset="ssvtp",
                             gel=os.path.join(folder, "tac_background.png")))
        return rows

    def _hct_rows(self, table_name):
        rows = []
        hct = os.path.join(self.root, "hct")
        for name in sorted(os.listdir(hct)) if os.path.isdir(hct) else []:
            table = os.path.join(hct, name, f"{table_name}.csv")
            if os.path.isfile(table):
                for record in tvl_records(table, ("url", "tactile", "tactile_background", "caption")):
                    folder = os.path.join(hct, name)
                    background = os.path.join(folder, record["tactile_background"])
                    if not os.path.isfile(background):  # TVL's fallback: the sensor's background image
                        background = str(Path(background).parents[2] / "digit_background.png")
                    rows.append(dict(vision=os.path.join(folder, record["url"]),
                                     touch=os.path.join(folder, record["tactile"]),
                                     background=background if self.subtract_background else None,
                                     caption=record["caption"].strip(), subset=name, gel=background))
        return rows

    def check_not_swapped(self, rows: list[dict], where: str, folders: int = 32):
        """Refuse rows whose vision and touch images are swapped (TVL's first public release had such folders: its
        revised release fixes them). The signal: a touch frame is the sensor's bare gel (`gel`: HCT's
        tactile_background, SSVTP's tac_background.png) plus a dent, so it lies far nearer that image than a camera
        frame does (mean pixel difference about 0.03-0.06 against 0.3 on the testbed's layout). One row per
        folder of vision images, for at most `folders` folders, is looked at: three small decodes each. Its limits:
        rows without a bare-gel image (SSVTP without tac_background.png) are not checked, a swap of single files
        inside a folder is seen only when that row is the one looked at, and a camera frame of something that looks
        like the bare gel would read as swapped (it must be twice as near the gel as its touch frame to count)."""
        first = {}  # one row per folder of vision images
        for row in rows:
            if os.path.isfile(row["gel"]) and (self.outside or self._inside(row["gel"])):
                first.setdefault(os.path.dirname(row["vision"]), row)
        sample = list(first.values())[::max(1, len(first) // folders)]
        small = {}

        def distance(path, gel) -> float:
            for file in (path, gel):
                if file not in small:
                    small[file] = resized(open_image(file), 32)
            return float((small[path] - small[gel]).abs().mean())

        swapped = []
        for row in sample:
            try:
                near, far = distance(row["vision"], row["gel"]), distance(row["touch"], row["gel"])
            except ValueError:  # an undecodable file is named when its row is read, not here
                continue
            if 2 * near < far:
                swapped.append((row, near, far))
        if swapped:
            row, near, far = swapped[0]
            raise ValueError(
                f"{where}: the vision and touch images look swapped in {len(swapped)} of the {len(sample)} folders "
                f"checked ({sorted({os.path.dirname(r['vision']) for r, _, _ in swapped})[:5]}): the vision image "
                f"{row['vision']} is nearer the touch sensor's bare-gel image {row['gel']} (mean difference {near:.2f}) "
                f"than its touch image {row['touch']} is ({far:.2f}), where a camera frame differs from the bare gel "
                "far more than a touch frame does. Swap those folders (or the url and tactile columns) back; TVL's "
                "first public release had folders swapped this way, and its revised release fixes them")

    def _files(self, row):  # SSVTP rows also need their labels file
        return super()._files(row) + ([row["labels"]] if "labels" in row else [])

    def load(self, modality, row):
        if modality == "vision":
            return tvl_vision(row["vision"], self.image_sizes["vision"], row["subset"])
        return tvl_touch(row["touch"], self.image_sizes["touch"], row["background"])
CSV_COLUMNS = {"vision": "vision", "touch": "touch", "caption": "text"}  # CSV column -> modality


def read_csv_table(table: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a CSV dataset's table, as a spreadsheet writes it: UTF-8 with or without a byte-order
    mark, names stripped of spaces. A repeated column name, a row with too few fields or another encoding is
    refused naming the file and the line."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            lines = list(reader)
    except UnicodeDecodeError as err:
        raise ValueError(f"{table} is not UTF-8 text ({err}); save it as CSV UTF-8") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{table} names the columns {repeated} more than once; keep one of each")
    for number, fields in enumerate(lines, start=2):
        if fields and len(fields) < len(header):
            raise ValueError(f"{table}, line {number}: {len(fields)} fields where the header has {len(header)} "
                             f"({header}); fill the missing ones")
    return header, [dict(zip(header, fields)) for fields in lines if fields]


def csv_columns(folder) -> list[str]:
    """The columns of <folder>/train.csv that name data (vision, touch, caption), in that order."""
    table = Path(folder) / "train.csv"
    header, _ = read_csv_table(table)
    found = [c for c in CSV_COLUMNS if c in header]
    if len(found) < 2:
        raise ValueError(f"{table} has columns {header}; a dataset needs at least two of {list(CSV_COLUMNS)} "
                         "(image paths relative to the CSV, and captions)")
    return found


def csv_modalities(folder) -> tuple[str, ...]:
    """The modalities of a CSV dataset: one per data column (caption -> text)."""
    return tuple(CSV_COLUMNS[c] for c in csv_columns(folder))


def dataset_layout(folder) -> str:
    """'csv' when the folder holds a train.csv of your own, else 'tvl' (ssvtp/, hct/)."""
    if Path(folder).is_file():
        raise ValueError(f"datasets_dir {folder} is a file; pass the folder that holds the data ({Path(folder).parent} "
                         "for its own train.csv)")
    return "csv" if (Path(folder) / "train.csv").is_file() else "tvl"


class CSVDataset(FileRows):
    """Your own data: <root>/train.csv (and optionally val.csv, test.csv) with columns among vision, touch
    (image paths relative to the CSV) and caption. Without test.csv, 10% of train.csv is the test split;
    without val.csv, 10% of the rest is the validation split (seed 42, as TVL splits). Images get a plain
    resize to image_size (one size, or {modality: size}); only the image modalities named there are loaded."""

    @classmethod
    def for_run(cls, root, split: str, sizes: dict[str, int], modalities, skip_missing: bool, touch_background: bool,
                outside: bool = False):
        """The split a phase-1 run asks for, after checking the CSV has a column for every modality it trains."""
        missing = set(modalities) - set(csv_modalities(root))
        if missing:
            raise ValueError(f"model.modalities {list(modalities)} asks for {sorted(missing)}, but {root}/train.csv "
                             f"has columns {csv_columns(root)}; set model.modalities to {list(csv_modalities(root))} "
                             "or a subset")
        return cls(root, split, sizes, skip_missing=skip_missing, outside=outside)

    def __init__(self, root, split="train", image_size=224, skip_missing=False, outside=False):
        if split not in ("train", "val", "test"):
            raise ValueError(f"CSV split must be train, val or test; got {split!r}")
        self.root, self.split, self.skip_missing, self.outside = os.path.abspath(root), split, skip_missing, outside
        if not (Path(self.root) / "train.csv").is_file():
            raise FileNotFoundError(f"no {self.root}/train.csv; a CSV dataset is a folder with train.csv (and "
                                    "optionally val.csv, test.csv) with columns among vision, touch, caption")
        self.columns = csv_columns(self.root)
        where = f"{self.root}/{split}.csv"
        rows = self.readable_rows(self._table(split), where)
        if split != "train":
            self.check_unseen(rows, where)
        if "caption" in self.columns and rows and not any(row["caption"] for row in rows):
            raise ValueError(f"{where}: every caption is empty, so there is no text to align or to caption; fill "
                             "the caption column, or drop it to train on the images alone")
        sizes = image_size if isinstance(image_size, dict) else dict.fromkeys(("vision", "touch"), image_size)
        super().__init__(rows, {m: size for m, size in sizes.items() if m in self.columns}, where)

    def check_unseen(self, rows: list[dict], where: str):
        """Refuse a val or test split that shows images the training split shows too (test.csv a copy of train.csv,
        or train.csv repeating rows, which the carved splits then share): its numbers would measure memory."""
        seen = {path for row in self._table("train") for path in self._files(row)}
        shared = [path for row in rows for path in self._files(row) if path in seen]
        if shared:
            given = (Path(self.root) / f"{self.split}.csv").is_file()
            fix = (f"remove those rows from {self.split}.csv (or from train.csv)" if given else
                   f"train.csv names those images in several rows, and the {self.split} rows are carved from it at "
                   f"random: give each image one row, or write a {self.split}.csv of images of its own")
            raise ValueError(f"{where}: {len(shared)} of its images are training images too (e.g. {shared[0]}), so it "
                             f"would measure memory, not generalisation; {fix}")

    def _table(self, split) -> list[dict]:
        """The rows of <split>.csv; a missing test.csv or val.csv is carved out of train.csv, test first."""
        root = Path(self.root)
        if split != "train" and (root / f"{split}.csv").is_file():
            return self._read(root / f"{split}.csv")
        rows = self._read(root / "train.csv")
        for held in ("test", "val"):
            if (root / f"{held}.csv").is_file():
                continue
            if split == held:
                return split_rows(rows, "held")
            rows = split_rows(rows, "train")
        return rows

    def _read(self, table: Path) -> list[dict]:
        header, records = read_csv_table(table)
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise ValueError(f"{table} lacks the columns {missing} that train.csv has; give every split the same columns")
        return [{c: (record[c].strip() if c == "caption" else str(table.parent / record[c])) for c in self.columns}
                | ({} if "caption" in self.columns else {"caption": ""}) for record in records]

    def load(self, modality, row):
        return load_image(row[modality], self.image_sizes[modality])


# Dataset layouts in a folder by the name TrainConfig.dataset gives them ("synthtouch" is generated, not read).
# Each class builds a run's split with `for_run`; a new layout is a class here, its entry, and its test in
# dataset_layout (what --datasets_dir detects).
LAYOUTS = {"tvl": TVLDataset, "csv": CSVDataset}


def write_csv_dataset(folder, splits: dict[str, list[dict]]) -> Path:
    """Write your-own-data layout: per split, rows of {"vision": image, "touch": image, "caption": str}
    (images as PIL images or 3xHxW tensors in [0, 1]) -> <folder>/images/<split>_<i>_<column>.png + <split>.csv."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        columns = [c for c in CSV_COLUMNS if c in rows[0]]
        records = [columns]
        for i, row in enumerate(tqdm(rows, desc=f"writing {split}.csv images", leave=False)):
            record = []
            for column in columns:
                if column == "caption":
                    record.append(row[column])
                    continue
                name = f"images/{split}_{i}_{column}.png"
                _pil(row[column]).save(folder / name)
                record.append(name)
            records.append(record)
        write_csv(folder / f"{split}.csv", records)
    return folder


def write_csv(path, rows: list[list]) -> Path:
    """A CSV file written atomically: a crash never leaves a table that ends mid-row."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(text.getvalue(), newline=""))


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def write_tvl_layout(folder, splits: dict[str, "SynthTouch"], image_size: int = 64) -> Path:
    """SynthTouch samples in the exact TVL layout, to try the TVL route without the data: even samples go to
    ssvtp/ (train.csv/test.csv with column url, text/labels_N.txt), odd ones to hct/data{1,2,3}/ (header
    url,tactile,tactile_background,caption, contact.json, a bare-gel background image). Vision images sit
    where TVL's crop finds them and touch images are turned so its rotation turns them back, so the prepared
    images are the rendered ones (up to JPEG and resizing)."""
    folder, number = Path(folder), 0
    tables = {}  # csv path -> rows
    gel = Image.new("RGB", (image_size, image_size), tuple(int(255 * c) for c in SynthTouch.GEL))
    for split, dataset in splits.items():
        for i in tqdm(range(len(dataset)), desc=f"writing TVL {split}", leave=False):
            sample = dataset[i]
            vision, touch = _pil(sample["vision"]), _pil(sample["touch"]).resize((image_size, image_size)).rotate(-90)
            subset = "ssvtp" if i % 2 == 0 else f"data{1 + i // 2 % 3}"
            width = max(4 * image_size, 272 if subset == "data3" else 0)  # data3 is cropped 200 px down
            side = int(math.ceil(TVL_CROP_SCALE * width))
            top = int(round((width - side) / 2)) if subset == "ssvtp" else TVL_DATA3_TOP * (subset == "data3")
            canvas = Image.new("RGB", (width, width), (128, 128, 128))
            canvas.paste(vision.resize((side, side), Image.Resampling.BILINEAR), ((width - side) // 2, top))
            if subset == "ssvtp":
                root, number = folder / "ssvtp", number + 1
                url = f"images_rgb/image_{number}_rgb.jpg"
                files = {url: canvas, url.replace("rgb", "tac"): touch}
                (root / "text").mkdir(parents=True, exist_ok=True)
                (root / "text" / f"labels_{number}.txt").write_text(sample["caption"] + "\n")
                tables.setdefault(root / f"{split}.csv", [["url"]]).append([url])
            else:
                root = folder / "hct" / subset
                row = [f"{split}/vision/{i}.jpg", f"{split}/tactile/{i}.jpg", "background/background.jpg"]
                files = {row[0]: canvas, row[1]: touch, row[2]: gel}
                tables.setdefault(root / f"{split}.csv", [["url", "tactile", "tactile_background", "caption"]]
                                  ).append(row + [sample["caption"]])
                contact = json.loads((root / "contact.json").read_text()) if (root / "contact.json").is_file() else {}
                for key, path in zip(("vision", "tactile", "background"), row):
                    contact.setdefault(key, []).append(path)
                root.mkdir(parents=True, exist_ok=True)
                (root / "contact.json").write_text(json.dumps(contact))
            for name, image in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / name, quality=90)
    for path, rows in tables.items():
        write_csv(path, rows)
    if (folder / "ssvtp").is_dir():  # the bare gel, for subtract_background (TVL ships its own)
        gel.save(folder / "ssvtp" / "tac_background.png")
    return folder


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_csv(folder, image_size: int = 32, n: int | None = None) -> Path:
    """A CSV dataset nobody here designed: scikit-learn's bundled handwritten digits (8x8, 1797 of them),
    upsampled to image_size RGB PNGs, captioned "a handwritten digit seven". train.csv and test.csv (the last
    20%, as sklearn orders them); val.csv is left to the 10% split. n: only the first n digits."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images[:n], digits.target[:n]
    rows = [{"vision": Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").resize(
                 (image_size, image_size), Image.Resampling.NEAREST),
             "caption": f"a handwritten digit {DIGIT_NAMES[label]}"} for image, label in zip(images, labels)]
    cut = int(len(rows) * 0.8)
    return write_csv_dataset(folder, {"train": rows[:cut], "test": rows[cut:]})


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
        if isinstance(image, (str, os.PathLike, Image.Image)):
            image = image_batch(image, size)[0]
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
    # One process builds a cache folder at a time (several notebooks, or torchrun ranks, may ask at once);
    # the others wait for the lock and then find the finished cache.
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _sweep_builds(folder)
        cached = _load_cache(folder, verify)
        if cached is None:
            if encoder is enc_cfg:
                from encoders import create_encoder
                encoder = (build or create_encoder)(enc_cfg)
            _build_cache(encoder, dataset, folder, batch_size, device)
            cached = _load_cache(folder, verify=False)
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
        old = folder.with_name(folder.name + f".old{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
