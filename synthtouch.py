"""SynthTouch, the touch-vision-language testbed whose latent factors are known, so the workbook can ask which register
token carries which factor: the factors and how they are drawn (`SynthTouchFactors`), the renderer of both images
(`SynthTouchRenderer`), and the dataset of seeded samples with their captions (`SynthTouch`).
Every item is {"vision": 3xSxS float in [0,1], "touch": same, "caption": str, "factors": dict, "index": int}."""
from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict

import numpy as np
import torch

from images import float_image


class SynthTouchFactors:
    """The latent factors: their values, who sees them, their words in captions, and how a sample draws them."""
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
    # how `SynthTouchRenderer.render` draws each phase, per texture: the period in pattern periods (φ and φ + period draw the
    # same surface), None where the texture does not depend on it (stripes run along y). A probe predicts
    # the phase on that circle (information.probe_target); a test checks these against the renderer.
    PHASE_PERIODS = {"phase_x": dict(stripes=1, checker=1, dots=1, waves=1),
                     "phase_y": dict(stripes=None, checker=2, dots=1, waves=1)}
    # fine, local factors: one value in [0, 1) per tile of a side×side grid, so that knowing them takes many
    # numbers, each about a small part of the image; this is what later register tokens are there for.
    # wear rubs the pattern off the central tiles, bleaching the ink and lowering the surface (seen and felt;
    # nine numbers that also make each sample one of a kind for exact-pair retrieval), stain darkens the ink of
    # each quarter of the picture to brown (seen only), compliance lets the central tiles sink deeper into the
    # gel (felt only). A value is a tuple of side² floats, row by row.
    DETAILS = OrderedDict(wear=3, stain=2, compliance=2)
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

    @classmethod
    def checked(cls, factors):
        """Chosen factors, each checked against its allowed values; details as tuples of floats."""
        for name, value in factors.items():
            if name in cls.FACTORS:
                if value not in cls.FACTORS[name]:
                    raise ValueError(f"factor {name!r} has no value {value!r}; allowed: {cls.FACTORS[name]}")
            elif name in cls.CONTINUOUS_FACTORS:
                low, high = cls.CONTINUOUS_FACTORS[name]
                if not low <= value < high:
                    raise ValueError(f"factor {name!r} value {value!r} is outside [{low}, {high})")
            elif name in cls.DETAILS:
                tiles = cls.DETAILS[name] ** 2
                if np.shape(value) != (tiles,) or not all(0 <= v < 1 for v in value):
                    raise ValueError(f"factor {name!r} needs {tiles} values in [0, 1), one per tile; got {value!r}")
                factors = {**factors, name: tuple(float(v) for v in value)}
            else:
                raise ValueError(f"unknown factor {name!r} (value {value!r}); allowed factors: "
                                 f"{list(cls.FACTORS) + list(cls.CONTINUOUS_FACTORS) + list(cls.DETAILS)}")
        return factors

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

    @classmethod
    def draw(cls, rng):
        """Every factor of one sample, from its factor stream."""
        factors = {name: values[rng.integers(len(values))] for name, values in cls.FACTORS.items()}
        factors.update({name: float(rng.uniform(low, high)) for name, (low, high) in cls.CONTINUOUS_FACTORS.items()})
        # every tile is drawn whatever the other values, so no factor shifts the random numbers of another
        factors.update({name: tuple(rng.uniform(0, 1, side * side).tolist()) for name, side in cls.DETAILS.items()})
        return factors


class SynthTouchRenderer:
    """Both images of a sample from its factors: the surface pattern, printed and seen by a camera (vision), pressed
    into a DIGIT-like gel lit by three LEDs (touch); the noise comes from the sample's own streams."""

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
    # how much of the image each grid covers: half the side of a centred square, in image widths. Every tile is
    # a whole number of the frozen encoders' 8-pixel patches at 64 pixels (wear 16, stain 32, compliance 16 px),
    # so no tile straddles a patch; wear and compliance do not share tile borders, so the gel tells them apart
    DETAIL_EXTENT = dict(wear=0.375, stain=0.5, compliance=0.25)

    def __init__(self, image_size):
        self.image_size = image_size

    def _tiles(self, name, values, outside, X, Y):
        """size×size map of a detail: each pixel gets its tile's value, `outside` beyond the grid."""
        side, extent = SynthTouchFactors.DETAILS[name], self.DETAIL_EXTENT[name]
        grid = np.asarray(values, dtype=np.float32).reshape(side, side)
        col = np.floor((X + extent) / (2 * extent) * side).astype(int)
        row = np.floor((Y + extent) / (2 * extent) * side).astype(int)
        inside = (col >= 0) & (col < side) & (row >= 0) & (row < side)
        return np.where(inside, grid[row.clip(0, side - 1), col.clip(0, side - 1)], np.float32(outside))

    def render(self, f, streams):
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

        return dict(vision=float_image(vision), touch=float_image(touch))

    @staticmethod
    def _blur(image, sigma):
        # Gaussian blur in the Fourier domain: numpy's FFT is single-threaded, whereas a BLAS matrix
        # product spawns threads that crawl when DataLoader workers or other jobs hold the cores.
        # The FFT wraps around the border, where the gel is flat, so the wrap is invisible.
        freq_y, freq_x = np.fft.fftfreq(image.shape[0])[:, None], np.fft.rfftfreq(image.shape[1])[None, :]
        gain = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (freq_x ** 2 + freq_y ** 2)).astype(np.float32)
        return np.fft.irfft2(np.fft.rfft2(image) * gain, s=image.shape)


class SynthTouch(SynthTouchFactors, torch.utils.data.Dataset):
    """`n` samples of one split, each rendered from its own seed (seed, split, index): any item, any time."""
    SPLITS = ("train", "val", "test")
    VERSION = "synthtouch-v5"  # changes whenever what a seed renders changes: it keys the feature cache

    def __init__(self, n, seed=0, image_size=64, split="train"):
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size!r}")
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {', '.join(self.SPLITS)}; got {split!r}")
        self.n, self.seed, self.image_size, self.split = int(n), int(seed), int(image_size), split
        self.split_id = self.SPLITS.index(split)
        self.renderer = SynthTouchRenderer(self.image_size)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        streams = self._streams(i)
        sample = self._sample(self.draw(streams[0]), streams)
        sample["index"] = int(i)
        return sample

    @property
    def fingerprint(self):
        return f"{self.VERSION}-n{self.n}-seed{self.seed}-s{self.image_size}-{self.split}"

    @property
    def captions(self):
        return [self.caption_of(factors) for factors in self.all_factors]

    @functools.cached_property
    def all_factors(self) -> list[dict]:
        """Every sample's factors, drawn once per dataset: captions, factor tables and factors_of read them here
        (drawing 4000 samples' streams takes about half a second, and one phase-2 run asked for them seven times)."""
        return [self.draw(self._streams(i)[0]) for i in range(self.n)]

    def factors_of(self, i):
        return dict(self.all_factors[self._index(i)])  # a copy: a caller that edits it changes no other caller's factors

    def factor_table(self):
        # discrete factors as integer codes into FACTORS[name], continuous ones as floats, details as N×side²
        rows = self.all_factors
        table = {name: np.array([values.index(r[name]) for r in rows]) for name, values in self.FACTORS.items()}
        table.update({name: np.array([r[name] for r in rows]) for name in (*self.CONTINUOUS_FACTORS, *self.DETAILS)})
        return table

    def render(self, factors, seed):
        """One sample from chosen factors; the rest, and the noise, come from `seed`."""
        factors = self.checked(factors)
        streams = self._streams_from(np.random.SeedSequence(seed))
        # draw every factor first so that fixing one factor never shifts the others
        sample = self._sample({**self.draw(streams[0]), **factors}, streams)
        sample["index"] = -1
        return sample

    # --- internals

    def _sample(self, factors, streams):
        return {**self.renderer.render(factors, streams), "caption": self.caption_of(factors), "factors": factors}

    def _index(self, i) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for SynthTouch of length {self.n}")
        return int(i)

    def _streams(self, i):
        return self._streams_from(np.random.SeedSequence([self.seed, self.split_id, self._index(i)]))

    @staticmethod
    def _streams_from(seed_sequence):
        # factors, vision noise and touch noise each get their own stream, so no modality's noise
        # depends on factor values or on the other modality: private factors stay pixel-exactly private
        return [np.random.default_rng(s) for s in seed_sequence.spawn(3)]
